/* dm_sd_notify: the datagram reaches a socket bound by the test (path and abstract). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cmocka.h>

#include "domicile/sdnotify.h"

/* Binds a datagram socket at `name` (a path, or '@' + abstract name); returns its fd. */
static int bind_notify_socket(const char *name)
{
    struct sockaddr_un sa;
    size_t len = strlen(name);
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    assert_true(len < sizeof(sa.sun_path));
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, name, len);
    if (name[0] == '@')
        sa.sun_path[0] = '\0';
    assert_int_equal(
        bind(fd, (struct sockaddr *)&sa, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len)),
        0);
    return fd;
}

/* Reads one datagram (waiting at most 2 s) into buf as a string; returns its length. */
static ssize_t recv_one(int fd, char *buf, size_t size)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    assert_int_equal(poll(&p, 1, 2000), 1);
    ssize_t n = recv(fd, buf, size - 1, MSG_DONTWAIT);
    assert_true(n >= 0);
    buf[n] = '\0';
    return n;
}

static void test_unset_is_noop(void **state)
{
    (void)state;
    unsetenv("NOTIFY_SOCKET");
    assert_int_equal(dm_sd_notify("READY=1"), 0);
    setenv("NOTIFY_SOCKET", "", 1);
    assert_int_equal(dm_sd_notify("READY=1"), 0);
    unsetenv("NOTIFY_SOCKET");
}

static void test_path_socket(void **state)
{
    (void)state;
    char dir[] = "/tmp/dm-sdnotify-XXXXXX";
    char path[128], buf[256];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/notify", dir);
    int fd = bind_notify_socket(path);
    setenv("NOTIFY_SOCKET", path, 1);

    assert_int_equal(dm_sd_notify("READY=1\nSTATUS=serving on 0.0.0.0:50051"), 1);
    recv_one(fd, buf, sizeof(buf));
    assert_string_equal(buf, "READY=1\nSTATUS=serving on 0.0.0.0:50051");

    assert_int_equal(dm_sd_notify("STOPPING=1"), 1);
    recv_one(fd, buf, sizeof(buf));
    assert_string_equal(buf, "STOPPING=1");

    close(fd);
    unlink(path);
    rmdir(dir);
    unsetenv("NOTIFY_SOCKET");
}

static void test_abstract_socket(void **state)
{
    (void)state;
    char name[64], buf[256];
    snprintf(name, sizeof(name), "@dm-sdnotify-test-%ld", (long)getpid());
    int fd = bind_notify_socket(name);
    setenv("NOTIFY_SOCKET", name, 1);

    assert_int_equal(dm_sd_notify("READY=1"), 1);
    recv_one(fd, buf, sizeof(buf));
    assert_string_equal(buf, "READY=1");

    close(fd);
    unsetenv("NOTIFY_SOCKET");
}

static void test_errors(void **state)
{
    (void)state;
    char longpath[200];
    /* Not a path nor an abstract name. */
    setenv("NOTIFY_SOCKET", "relative/notify", 1);
    assert_int_equal(dm_sd_notify("READY=1"), -EINVAL);
    setenv("NOTIFY_SOCKET", "@", 1);
    assert_int_equal(dm_sd_notify("READY=1"), -EINVAL);
    /* Longer than sun_path. */
    memset(longpath, 'a', sizeof(longpath) - 1);
    longpath[0] = '/';
    longpath[sizeof(longpath) - 1] = '\0';
    setenv("NOTIFY_SOCKET", longpath, 1);
    assert_int_equal(dm_sd_notify("READY=1"), -EINVAL);
    /* Nobody listens there: the error is returned, not raised. */
    setenv("NOTIFY_SOCKET", "/nonexistent-dir-dm-sdnotify/notify", 1);
    assert_int_equal(dm_sd_notify("READY=1"), -ENOENT);
    unsetenv("NOTIFY_SOCKET");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_unset_is_noop),
        cmocka_unit_test(test_path_socket),
        cmocka_unit_test(test_abstract_socket),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
