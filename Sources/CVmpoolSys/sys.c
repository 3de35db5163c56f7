#define _GNU_SOURCE
#include "cvmpoolsys.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

extern char **environ;

ssize_t vmpool_send_with_fd(int sock, const void *data, size_t len, int fd) {
    struct iovec iov = {.iov_base = (void *)data, .iov_len = len};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof(control));
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof(control.buf);
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
    ssize_t sent;
    do {
        sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    return sent;
}

int vmpool_unix_connect(const char *path) { return vmpool_unix_connect_flags(path, 0); }

int vmpool_unix_connect_flags(const char *path, int flags) {
    struct sockaddr_un addr;
    size_t len = strlen(path);
    if (len >= sizeof(addr.sun_path)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | flags, 0);
    if (sock < 0) return -1;
    memset(&addr, 0, sizeof(addr));
    addr.sun_family = AF_UNIX;
    memcpy(addr.sun_path, path, len + 1);
    int rc;
    do {
        rc = connect(sock, (struct sockaddr *)&addr, sizeof(addr));
    } while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        int saved = errno;
        close(sock);
        errno = saved;
        return -1;
    }
    return sock;
}

static int spawn(const char *path, char *const argv[], char *const envp[], int stdin_fd, int stdout_fd,
                 int stderr_fd, short flags) {
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attr;
    if (posix_spawn_file_actions_init(&actions) != 0) return -1;
    if (posix_spawnattr_init(&attr) != 0) {
        posix_spawn_file_actions_destroy(&actions);
        return -1;
    }
    if (stdin_fd >= 0) {
        posix_spawn_file_actions_adddup2(&actions, stdin_fd, 0);
    } else {
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    }
    if (stdout_fd >= 0) {
        posix_spawn_file_actions_adddup2(&actions, stdout_fd, 1);
    } else {
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
    }
    if (stderr_fd >= 0) {
        posix_spawn_file_actions_adddup2(&actions, stderr_fd, 2);
    } else {
        posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
    }
    posix_spawn_file_actions_addclosefrom_np(&actions, 3);
    posix_spawnattr_setflags(&attr, flags | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setsigdefault(&attr, &all);
    pid_t pid = -1;
    int rc = posix_spawn(&pid, path, &actions, &attr, argv, envp ? envp : environ);
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
    if (rc != 0) {
        errno = rc;
        return -1;
    }
    return pid;
}

int vmpool_spawn(const char *path, char *const argv[], int stderr_fd) {
    return spawn(path, argv, NULL, -1, -1, stderr_fd, POSIX_SPAWN_SETSID);
}

int vmpool_spawn_env(const char *path, char *const argv[], char *const envp[], int stdout_fd, int stderr_fd) {
    return spawn(path, argv, envp, -1, stdout_fd, stderr_fd, 0);
}

int vmpool_spawn_io(const char *path, char *const argv[], char *const envp[], int stdin_fd, int stdout_fd,
                    int stderr_fd) {
    return spawn(path, argv, envp, stdin_fd, stdout_fd, stderr_fd, 0);
}

int vmpool_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

int vmpool_open_pty(char *name, size_t size) {
    int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (master < 0) return -1;
    if (grantpt(master) != 0 || unlockpt(master) != 0 || ptsname_r(master, name, size) != 0) {
        close(master);
        return -1;
    }
    return master;
}

int vmpool_wait(int pid) {
    int status = 0;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) return -1;
    }
    return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
}

int vmpool_spawn_inherit(const char *path, char *const argv[], const int keep[2]) {
    posix_spawn_file_actions_t actions;
    if (posix_spawn_file_actions_init(&actions) != 0) return -1;
    // keep[0] and keep[1] become the child's 3 and 4; everything else above 4 is closed.
    posix_spawn_file_actions_adddup2(&actions, keep[0], 3);
    posix_spawn_file_actions_adddup2(&actions, keep[1], 4);
    posix_spawn_file_actions_addclosefrom_np(&actions, 5);
    pid_t pid = -1;
    int rc = posix_spawn(&pid, path, &actions, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&actions);
    if (rc != 0) {
        errno = rc;
        return -1;
    }
    return pid;
}

static int punch(int fd, off_t start, off_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, length) == 0 ? 0 : -errno;
}

long long vmpool_punch_zero_pages(int fd) {
    enum { PAGE = 4096, CHUNK = 1 << 20 };
    static const char zero[PAGE];
    char *buf = malloc(CHUNK);
    if (buf == NULL) return -ENOMEM;
    long long freed = 0;
    int error = 0;
    off_t offset = 0;
    while (error == 0) {
        off_t data = lseek(fd, offset, SEEK_DATA);
        if (data < 0) {
            if (errno != ENXIO) error = -errno; /* ENXIO: no data after `offset` */
            break;
        }
        off_t end = lseek(fd, data, SEEK_HOLE);
        if (end < 0) {
            error = -errno;
            break;
        }
        offset = data;
        while (offset < end && error == 0) {
            size_t want = end - offset < CHUNK ? (size_t)(end - offset) : CHUNK;
            ssize_t got = pread(fd, buf, want, offset);
            if (got < 0 && errno == EINTR) continue;
            if (got <= 0) {
                error = got < 0 ? -errno : 0;
                offset = end;
                break;
            }
            off_t run = -1; /* start of the current run of zero pages */
            ssize_t pages = got / PAGE * PAGE;
            for (ssize_t at = 0; at < pages && error == 0; at += PAGE) {
                if (memcmp(buf + at, zero, PAGE) == 0) {
                    if (run < 0) run = offset + at;
                } else if (run >= 0) {
                    error = punch(fd, run, offset + at - run);
                    if (error == 0) freed += offset + at - run;
                    run = -1;
                }
            }
            if (run >= 0 && error == 0) {
                error = punch(fd, run, offset + pages - run);
                if (error == 0) freed += offset + pages - run;
            }
            offset += pages > 0 ? pages : got;
        }
    }
    free(buf);
    return error != 0 ? error : freed;
}

int vmpool_rename_noreplace(int olddirfd, const char *oldpath, int newdirfd, const char *newpath) {
    return renameat2(olddirfd, oldpath, newdirfd, newpath, RENAME_NOREPLACE);
}

int vmpool_set_pipe_size(int fd, int size) { return fcntl(fd, F_SETPIPE_SZ, size); }

static volatile int signal_pipe_write = -1;

static void signal_to_pipe(int sig) {
    int saved = errno;
    unsigned char byte = (unsigned char)sig;
    if (signal_pipe_write >= 0) {
        ssize_t rc = write(signal_pipe_write, &byte, 1);
        (void)rc;
    }
    errno = saved;
}

int vmpool_trap_signals(const int *signals, int count) {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) return -1;
    signal_pipe_write = fds[1];
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = signal_to_pipe;
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    for (int i = 0; i < count; i++) {
        if (sigaction(signals[i], &action, NULL) != 0) return -1;
    }
    return fds[0];
}
