/*
 * sd_notify(3) without libsystemd: one datagram to the unix socket named by $NOTIFY_SOCKET.
 */
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "domicile/sdnotify.h"

int dm_sd_notify(const char *state)
{
    const char *path = getenv("NOTIFY_SOCKET");
    struct sockaddr_un sa;
    size_t len, n;
    ssize_t sent;
    int fd, err;

    if (!path || !path[0])
        return 0;
    len = strlen(path);
    /* Only filesystem paths and abstract names (vsock: addresses are for VMs, not us). */
    if ((path[0] != '/' && path[0] != '@') || len < 2 || len > sizeof(sa.sun_path))
        return -EINVAL;
    if (path[0] == '/' && len == sizeof(sa.sun_path))
        return -EINVAL; /* no room for the terminating NUL of a path */

    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, path, len);
    if (sa.sun_path[0] == '@')
        sa.sun_path[0] = '\0'; /* abstract: the name is the exact bytes after the NUL */

    fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    n = strlen(state);
    /* An abstract address's length counts exactly its bytes; a path's may include the NUL. */
    sent = sendto(fd, state, n, MSG_NOSIGNAL, (const struct sockaddr *)&sa,
                  (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len));
    err = sent < 0 ? errno : 0;
    close(fd);
    if (err)
        return -err;
    return (size_t)sent == n ? 1 : -EMSGSIZE;
}
