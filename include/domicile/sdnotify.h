/*
 * systemd readiness notification (sd_notify(3) protocol) without libsystemd.
 *
 * The service manager passes the path of a datagram socket in $NOTIFY_SOCKET (a leading '@'
 * means a Linux abstract socket); the daemon sends newline-separated VAR=value assignments to
 * it, e.g. "READY=1\nSTATUS=serving on 0.0.0.0:50051" or "STOPPING=1".
 *
 * Thread-safety: safe from any thread (one socket per call, nothing shared).
 */
#ifndef DOMICILE_SDNOTIFY_H
#define DOMICILE_SDNOTIFY_H

/**
 * Sends `state` as one datagram to $NOTIFY_SOCKET.
 * Returns 1 when sent, 0 when NOTIFY_SOCKET is unset or empty (not started by a service
 * manager that listens: nothing to do), or -errno on failure (-EINVAL for a socket address
 * that is not an absolute path or '@' name, or too long).
 */
int dm_sd_notify(const char *state);

#endif
