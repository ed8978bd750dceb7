/*
 * domicile-wanproxy: a TCP proxy that delays each direction of every connection by a fixed
 * one-way time, so that gateway-to-gateway calls on one machine cost what they would cost
 * between regions (the kernel's netem is not available where the project runs).
 *
 * One thread, one epoll set, one timerfd. Bytes read at time t are written at t + delay,
 * in order; each direction buffers at most --buffer bytes and stops reading beyond that, so
 * a slow receiver slows the sender as TCP would. See src/wanproxy/README.md.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define PROG            "domicile-wanproxy"
#define MAX_ROUTES      64
#define READ_SIZE       65536
#define READS_PER_EVENT 4
#define DEFAULT_BUFFER  (8u << 20)

enum ev_kind {
    EV_LISTENER,
    EV_SIDE,
    EV_SIGNAL,
    EV_TIMER,
};

/* Epoll's data.ptr points at one of these (the first member of every registered object). */
struct ev {
    enum ev_kind kind;
};

struct route {
    struct ev ev;
    int fd;
    char *listen_spec; /* owned */
    char *target_spec; /* owned */
    struct sockaddr_storage target;
    socklen_t target_len;
    uint64_t delay_ns;
    int port;    /* the bound port (differs from the spec's when it asked for 0) */
    bool paused; /* accept failed with EMFILE/ENFILE: out of epoll until a connection ends */
};

enum chunk_kind {
    CH_DATA,
    CH_EOF, /* the source shut down its write side: shutdown(dst, SHUT_WR) */
    CH_RST, /* the source reset: reset the destination too */
};

struct chunk {
    struct chunk *next;
    uint64_t due; /* CLOCK_MONOTONIC ns at which it may be written */
    enum chunk_kind kind;
    size_t len, off;
    unsigned char data[];
};

/* Bytes travelling from side i to side 1 - i of a connection. */
struct dir {
    struct chunk *head, *tail; /* owned */
    size_t queued;             /* data bytes in the queue */
    bool eof_read;             /* the source said EOF, or failed: read no more */
    bool done;                 /* EOF delivered (write side of the destination shut) */
};

struct conn;

struct side {
    struct ev ev;
    struct conn *conn;
    int idx; /* 0: the accepted client, 1: the upstream connection */
    int fd;
    uint32_t mask; /* registered events; 0 = not in the epoll set */
    bool dead;     /* reset or failed: neither read nor written again */
};

struct conn {
    struct conn *prev, *next; /* the list of live connections */
    struct route *route;
    struct side s[2];
    struct dir d[2];
    bool connecting;         /* upstream connect() in progress */
    bool closed;             /* freed at the end of the loop iteration that closed it */
    struct conn *grave_next; /* the list of closed connections still to free */
    uint64_t id;
};

static struct route routes[MAX_ROUTES];
static int n_routes;
static int epfd = -1, timer_fd = -1, sig_fd = -1;
static struct ev signal_ev = {EV_SIGNAL}, timer_ev = {EV_TIMER};
static struct conn *conns;
/* Closed in this loop iteration, freed at its end: events of the same epoll_wait batch may
 * still point at them. */
static struct conn *graveyard;
static size_t max_buffer = DEFAULT_BUFFER;
static bool verbose;
static uint64_t next_id = 1;
static uint64_t armed_at; /* the timerfd's current expiry, 0 = disarmed */

/* ---------------------------------------------------------------------------------------- */

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs(PROG ": ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n);
    if (!p) {
        say("out of memory");
        abort();
    }
    return p;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* "host:port" or "[v6]:port" → a socket address; port may be 0 when `passive`. */
static bool resolve(const char *spec, bool passive, struct sockaddr_storage *out,
                    socklen_t *out_len)
{
    char host[256];
    const char *colon = strrchr(spec, ':');
    if (!colon || colon == spec || !colon[1])
        return false;
    size_t hl = (size_t)(colon - spec);
    const char *h = spec;
    if (spec[0] == '[' && colon[-1] == ']') {
        h = spec + 1;
        hl -= 2;
    }
    if (hl == 0 || hl >= sizeof(host))
        return false;
    memcpy(host, h, hl);
    host[hl] = '\0';
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end || port < (passive ? 0 : 1) || port > 65535)
        return false;
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0)};
    struct addrinfo *ai = NULL;
    if (getaddrinfo(host, colon + 1, &hints, &ai) != 0 || !ai)
        return false;
    memcpy(out, ai->ai_addr, ai->ai_addrlen);
    *out_len = ai->ai_addrlen;
    freeaddrinfo(ai);
    return true;
}

/* LISTEN=TARGET@DELAY_MS */
static bool parse_route(const char *arg, struct route *r)
{
    const char *eq = strchr(arg, '=');
    const char *at = strrchr(arg, '@');
    if (!eq || !at || at < eq)
        return false;
    char *end;
    errno = 0;
    double ms = strtod(at + 1, &end);
    if (errno || end == at + 1 || *end || !(ms >= 0) || ms > 600000)
        return false;
    r->listen_spec = strndup(arg, (size_t)(eq - arg));
    r->target_spec = strndup(eq + 1, (size_t)(at - eq - 1));
    if (!r->listen_spec || !r->target_spec)
        abort();
    r->delay_ns = (uint64_t)(ms * 1e6 + 0.5);
    r->ev.kind = EV_LISTENER;
    r->fd = -1;
    return resolve(r->target_spec, false, &r->target, &r->target_len);
}

static void set_nodelay(int fd)
{
    /* Nagle would hold back a small write until the previous one is acknowledged — one more
     * emulated round trip that no real path has. */
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* ---------------------------------------------------------------------------------------- */
/* epoll registration */

static void ep_set(int fd, struct ev *ev, uint32_t *cur, uint32_t want)
{
    if (*cur == want)
        return;
    /* A socket in the set is reported on HUP and ERR even with no events asked for: while it
     * has nothing to do it leaves the set, or a half-closed socket would wake us forever. */
    struct epoll_event e = {.events = want, .data.ptr = ev};
    int op = *cur == 0 ? EPOLL_CTL_ADD : want == 0 ? EPOLL_CTL_DEL : EPOLL_CTL_MOD;
    if (epoll_ctl(epfd, op, fd, &e) != 0) {
        say("epoll_ctl(fd %d): %s", fd, strerror(errno));
        abort();
    }
    *cur = want;
}

static void side_release(struct side *s)
{
    if (s->fd >= 0) {
        ep_set(s->fd, &s->ev, &s->mask, 0);
        close(s->fd);
        s->fd = -1;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* connections */

static void dir_clear(struct dir *d)
{
    struct chunk *c = d->head;
    while (c) {
        struct chunk *n = c->next;
        free(c);
        c = n;
    }
    d->head = d->tail = NULL;
    d->queued = 0;
}

static void dir_push(struct dir *d, enum chunk_kind kind, uint64_t due, const void *data,
                     size_t len)
{
    struct chunk *c = xmalloc(sizeof(*c) + len);
    c->next = NULL;
    c->due = due;
    c->kind = kind;
    c->len = len;
    c->off = 0;
    if (len)
        memcpy(c->data, data, len);
    if (d->tail)
        d->tail->next = c;
    else
        d->head = c;
    d->tail = c;
    d->queued += len;
}

static void dir_pop(struct dir *d)
{
    struct chunk *c = d->head;
    d->head = c->next;
    if (!d->head)
        d->tail = NULL;
    d->queued -= c->len;
    free(c);
}

static void free_graveyard(void)
{
    while (graveyard) {
        struct conn *c = graveyard;
        graveyard = c->grave_next;
        free(c);
    }
}

static void resume_listeners(void)
{
    for (int i = 0; i < n_routes; i++) {
        if (routes[i].paused) {
            struct epoll_event e = {.events = EPOLLIN, .data.ptr = &routes[i].ev};
            if (epoll_ctl(epfd, EPOLL_CTL_ADD, routes[i].fd, &e) == 0)
                routes[i].paused = false;
        }
    }
}

/* `reset`: close with SO_LINGER 0, which sends RST instead of FIN. */
static void conn_close(struct conn *c, bool reset)
{
    if (c->closed)
        return;
    for (int i = 0; i < 2; i++) {
        if (reset && c->s[i].fd >= 0 && !c->s[i].dead) {
            struct linger lg = {.l_onoff = 1, .l_linger = 0};
            setsockopt(c->s[i].fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
        }
        side_release(&c->s[i]);
        dir_clear(&c->d[i]);
    }
    if (c->prev)
        c->prev->next = c->next;
    else
        conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->closed = true;
    if (verbose)
        say("connection %" PRIu64 " on %s %s", c->id, c->route->listen_spec,
            reset ? "reset" : "closed");
    c->grave_next = graveyard;
    graveyard = c;
    resume_listeners();
}

/* Side k failed (reset, refused, broken pipe): it is read and written no more; what it had
 * sent still arrives, then the other side is reset too — one delay later, as the RST would
 * have travelled. */
static void side_failed(struct conn *c, int k, int err)
{
    struct side *s = &c->s[k];
    if (s->dead)
        return;
    if (verbose)
        say("connection %" PRIu64 ": %s side: %s", c->id, k ? "upstream" : "client", strerror(err));
    s->dead = true;
    side_release(s);
    dir_clear(&c->d[1 - k]); /* bytes for a dead socket */
    c->d[1 - k].done = true;
    struct dir *d = &c->d[k];
    if (!d->done) {
        d->eof_read = true;
        dir_push(d, CH_RST, now_ns() + c->route->delay_ns, NULL, 0);
    } else {
        conn_close(c, false);
    }
}

static void conn_open(struct route *r, int cfd)
{
    int ufd = socket(r->target.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (ufd < 0) {
        say("socket: %s", strerror(errno));
        close(cfd);
        return;
    }
    set_nodelay(cfd);
    set_nodelay(ufd);
    struct conn *c = xmalloc(sizeof(*c));
    memset(c, 0, sizeof(*c));
    c->route = r;
    c->id = next_id++;
    for (int i = 0; i < 2; i++) {
        c->s[i].ev.kind = EV_SIDE;
        c->s[i].conn = c;
        c->s[i].idx = i;
    }
    c->s[0].fd = cfd;
    c->s[1].fd = ufd;
    c->next = conns;
    if (conns)
        conns->prev = c;
    conns = c;
    if (verbose)
        say("connection %" PRIu64 " on %s → %s", c->id, r->listen_spec, r->target_spec);
    if (connect(ufd, (struct sockaddr *)&r->target, r->target_len) == 0)
        return;
    if (errno == EINPROGRESS) {
        c->connecting = true;
        return;
    }
    side_failed(c, 1, errno);
}

static void accept_all(struct route *r)
{
    for (;;) {
        int fd = accept4(r->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            conn_open(r, fd);
            continue;
        }
        if (errno == EINTR || errno == ECONNABORTED)
            continue;
        if (errno == EMFILE || errno == ENFILE) {
            /* Level-triggered: the pending connection would wake us at once again. Stop
             * accepting until a connection closes and frees a descriptor. */
            say("accept on %s: %s (pausing until a connection ends)", r->listen_spec,
                strerror(errno));
            epoll_ctl(epfd, EPOLL_CTL_DEL, r->fd, NULL);
            r->paused = true;
        } else if (errno != EAGAIN && errno != EWOULDBLOCK) {
            say("accept on %s: %s", r->listen_spec, strerror(errno));
        }
        return;
    }
}

static void side_read(struct conn *c, int k)
{
    static unsigned char buf[READ_SIZE];
    struct dir *d = &c->d[k];
    for (int i = 0; i < READS_PER_EVENT && !d->eof_read && d->queued < max_buffer; i++) {
        ssize_t n = recv(c->s[k].fd, buf, sizeof(buf), 0);
        if (n > 0) {
            dir_push(d, CH_DATA, now_ns() + c->route->delay_ns, buf, (size_t)n);
            continue;
        }
        if (n == 0) {
            d->eof_read = true;
            dir_push(d, CH_EOF, now_ns() + c->route->delay_ns, NULL, 0);
            return;
        }
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            side_failed(c, k, errno);
        return;
    }
}

static void connect_done(struct conn *c)
{
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(c->s[1].fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
        err = errno;
    if (err == EINPROGRESS || err == EALREADY)
        return;
    c->connecting = false;
    if (err)
        side_failed(c, 1, err);
}

/* Writes what is due from side k to the other side. */
static void pump(struct conn *c, int k, uint64_t now)
{
    struct dir *d = &c->d[k];
    struct side *dst = &c->s[1 - k];
    while (!c->closed && d->head && d->head->due <= now) {
        struct chunk *h = d->head;
        if (h->kind == CH_RST) {
            conn_close(c, true);
            return;
        }
        if (dst->dead) {
            dir_clear(d);
            return;
        }
        if (k == 0 && c->connecting)
            return;
        if (h->kind == CH_EOF) {
            shutdown(dst->fd, SHUT_WR);
            d->done = true;
            dir_pop(d);
            if (c->d[1 - k].done)
                conn_close(c, false);
            return;
        }
        ssize_t n = send(dst->fd, h->data + h->off, h->len - h->off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                side_failed(c, 1 - k, errno);
            return;
        }
        h->off += (size_t)n;
        if (h->off == h->len)
            dir_pop(d);
    }
}

static bool write_blocked(struct conn *c, int k, uint64_t now)
{
    const struct dir *d = &c->d[k];
    return d->head && d->head->due <= now && d->head->kind == CH_DATA && !c->s[1 - k].dead;
}

/* The events each side needs now: reading while its direction has room, writing while due
 * bytes for it wait on a full socket buffer (or, upstream, while connect() runs). */
static void conn_update(struct conn *c, uint64_t now)
{
    for (int k = 0; k < 2 && !c->closed; k++) {
        struct side *s = &c->s[k];
        if (s->dead || s->fd < 0)
            continue;
        uint32_t want = 0;
        bool can_read = !(k == 1 && c->connecting);
        if (can_read && !c->d[k].eof_read && c->d[k].queued < max_buffer)
            want |= EPOLLIN;
        if ((k == 1 && c->connecting) || (!c->connecting && write_blocked(c, 1 - k, now)))
            want |= EPOLLOUT;
        ep_set(s->fd, &s->ev, &s->mask, want);
    }
}

static uint64_t conn_next_due(const struct conn *c, uint64_t now)
{
    uint64_t best = 0;
    for (int k = 0; k < 2; k++) {
        const struct chunk *h = c->d[k].head;
        if (h && h->due > now && (!best || h->due < best))
            best = h->due;
    }
    return best;
}

static void arm_timer(uint64_t due)
{
    if (due == armed_at)
        return;
    struct itimerspec its = {0};
    if (due) {
        its.it_value.tv_sec = (time_t)(due / 1000000000u);
        its.it_value.tv_nsec = (long)(due % 1000000000u);
    }
    if (timerfd_settime(timer_fd, TFD_TIMER_ABSTIME, &its, NULL) != 0) {
        say("timerfd_settime: %s", strerror(errno));
        abort();
    }
    armed_at = due;
}

static void side_event(struct side *s, uint32_t events)
{
    struct conn *c = s->conn;
    int k = s->idx;
    if (c->closed || s->dead)
        return;
    if (k == 1 && c->connecting) {
        if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))
            connect_done(c);
        return;
    }
    if (events & (EPOLLIN | EPOLLHUP | EPOLLRDHUP))
        side_read(c, k);
    if (c->closed || s->dead)
        return;
    if ((events & EPOLLERR) && !(s->mask & EPOLLIN)) {
        int err = 0;
        socklen_t len = sizeof(err);
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        side_failed(c, k, err ? err : ECONNRESET);
        return;
    }
    /* EPOLLOUT: pump() below writes what is due for this side. */
}

/* ---------------------------------------------------------------------------------------- */

static int listen_on(struct route *r)
{
    struct sockaddr_storage ss;
    socklen_t len;
    if (!resolve(r->listen_spec, true, &ss, &len)) {
        say("cannot parse listen address '%s'", r->listen_spec);
        return -1;
    }
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
        bind(fd, (struct sockaddr *)&ss, len) != 0 || listen(fd, 128) != 0) {
        say("cannot listen on %s: %s", r->listen_spec, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    len = sizeof(ss);
    getsockname(fd, (struct sockaddr *)&ss, &len);
    r->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                             : ((struct sockaddr_in *)&ss)->sin_port);
    r->fd = fd;
    return 0;
}

static void usage(FILE *f)
{
    fputs("usage: " PROG " --route LISTEN=TARGET@DELAY_MS [--route ...] [options]\n"
          "  -r, --route L=T@MS   listen on host:port L (port 0 = any), forward each\n"
          "                       connection to host:port T, delaying each direction by MS\n"
          "                       milliseconds (one way; decimals allowed)\n"
          "      --ready-fd N     write \"READY <port> [<port>...]\\n\" (one per route, in\n"
          "                       order) to fd N once listening, then close it\n"
          "      --buffer BYTES   bytes held per direction before reading stops (default\n"
          "                       8388608)\n"
          "  -v, --verbose        log every connection\n"
          "SIGTERM or SIGINT: close everything and exit 0.\n",
          f);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"route", required_argument, NULL, 'r'},  {"ready-fd", required_argument, NULL, 'f'},
        {"buffer", required_argument, NULL, 'b'}, {"verbose", no_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},         {NULL, 0, NULL, 0},
    };
    int ready_fd = -1, opt;
    char *end;
    while ((opt = getopt_long(argc, argv, "r:vh", opts, NULL)) != -1) {
        switch (opt) {
        case 'r':
            if (n_routes == MAX_ROUTES) {
                say("at most %d routes", MAX_ROUTES);
                return 2;
            }
            if (!parse_route(optarg, &routes[n_routes])) {
                say("bad route '%s' (want LISTEN_HOST:PORT=TARGET_HOST:PORT@DELAY_MS)", optarg);
                return 2;
            }
            n_routes++;
            break;
        case 'f':
            ready_fd = (int)strtol(optarg, &end, 10);
            if (*end || ready_fd < 0) {
                say("bad --ready-fd '%s'", optarg);
                return 2;
            }
            break;
        case 'b': {
            unsigned long long v = strtoull(optarg, &end, 10);
            if (*end || v < 1024 || v > (1ull << 32)) {
                say("--buffer must be 1024 to 4294967296 bytes, not '%s'", optarg);
                return 2;
            }
            max_buffer = (size_t)v;
            break;
        }
        case 'v':
            verbose = true;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind != argc || n_routes == 0) {
        usage(stderr);
        return 2;
    }

    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    signal(SIGPIPE, SIG_IGN);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    sig_fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (epfd < 0 || sig_fd < 0 || timer_fd < 0) {
        say("epoll/signalfd/timerfd: %s", strerror(errno));
        return 1;
    }
    struct epoll_event e = {.events = EPOLLIN, .data.ptr = &signal_ev};
    epoll_ctl(epfd, EPOLL_CTL_ADD, sig_fd, &e);
    e.data.ptr = &timer_ev;
    epoll_ctl(epfd, EPOLL_CTL_ADD, timer_fd, &e);
    for (int i = 0; i < n_routes; i++) {
        if (listen_on(&routes[i]) != 0)
            return 1;
        e.data.ptr = &routes[i].ev;
        epoll_ctl(epfd, EPOLL_CTL_ADD, routes[i].fd, &e);
        say("listening on %s (port %d) → %s, %.3f ms each way", routes[i].listen_spec,
            routes[i].port, routes[i].target_spec, (double)routes[i].delay_ns / 1e6);
    }
    if (ready_fd >= 0) {
        char line[16 + MAX_ROUTES * 7];
        size_t n = (size_t)snprintf(line, sizeof(line), "READY");
        for (int i = 0; i < n_routes; i++)
            n += (size_t)snprintf(line + n, sizeof(line) - n, " %d", routes[i].port);
        n += (size_t)snprintf(line + n, sizeof(line) - n, "\n");
        if (write(ready_fd, line, n) != (ssize_t)n)
            say("cannot write the readiness line to fd %d: %s", ready_fd, strerror(errno));
        close(ready_fd);
    }

    struct epoll_event evs[64];
    for (;;) {
        int n = epoll_wait(epfd, evs, 64, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            say("epoll_wait: %s", strerror(errno));
            return 1;
        }
        for (int i = 0; i < n; i++) {
            struct ev *ev = evs[i].data.ptr;
            switch (ev->kind) {
            case EV_LISTENER:
                accept_all((struct route *)ev);
                break;
            case EV_SIGNAL: {
                struct signalfd_siginfo si;
                if (read(sig_fd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
                    say("signal %u: exiting", si.ssi_signo);
                    while (conns)
                        conn_close(conns, false);
                    free_graveyard();
                    return 0;
                }
                break;
            }
            case EV_TIMER: {
                uint64_t ticks;
                if (read(timer_fd, &ticks, sizeof(ticks)) < 0 && errno != EAGAIN)
                    say("timerfd read: %s", strerror(errno));
                armed_at = 0;
                break;
            }
            case EV_SIDE:
                side_event((struct side *)ev, evs[i].events);
                break;
            }
        }
        uint64_t now = now_ns(), next = 0;
        for (struct conn *c = conns, *nx; c; c = nx) {
            nx = c->next;
            for (int k = 0; k < 2; k++)
                pump(c, k, now);
            if (c->closed)
                continue;
            conn_update(c, now);
            uint64_t due = conn_next_due(c, now);
            if (due && (!next || due < next))
                next = due;
        }
        arm_timer(next);
        free_graveyard();
    }
}
