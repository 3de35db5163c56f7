#define _GNU_SOURCE
#include "cvmpoolsys_cgroup.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

int vmpool_cgroup_join(const int *fds, int count, int *failed) {
    for (int i = 0; i < count; i++) {
        ssize_t written;
        do {
            written = write(fds[i], "0", 1);
        } while (written < 0 && errno == EINTR);
        if (written != 1) {
            if (written >= 0) errno = EIO;
            if (failed != NULL) *failed = i;
            return -1;
        }
    }
    return 0;
}

/* Writes all of `len` bytes, retrying on EINTR; async-signal-safe. */
static void write_all(int fd, const void *data, size_t len) {
    const char *at = data;
    while (len > 0) {
        ssize_t written = write(fd, at, len);
        if (written < 0 && errno == EINTR) continue;
        if (written <= 0) return;
        at += written;
        len -= (size_t)written;
    }
}

/* Moves `fd` to a descriptor at or above `floor` (so the dup2s below cannot clobber it). */
static int lift(int fd, int floor) {
    if (fd < 0 || fd >= floor) return fd;
    return fcntl(fd, F_DUPFD_CLOEXEC, floor);
}

/* The child's side: only async-signal-safe calls; reports errno on `report` and exits. */
static void child(const char *path, char *const argv[], const int *fds, int count, int stderr_fd, int report) {
    int error = 0;
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    struct sigaction dfl = {0};
    dfl.sa_handler = SIG_DFL;
    for (int sig = 1; sig < NSIG; sig++) {
        if (sig != SIGKILL && sig != SIGSTOP) sigaction(sig, &dfl, NULL);
    }
    if (vmpool_cgroup_join(fds, count, NULL) != 0) goto fail;
    if (setsid() < 0) goto fail;
    report = lift(report, 3);
    stderr_fd = lift(stderr_fd, 3);
    if (report < 0) _exit(127);
    int null_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null_fd < 0) goto fail;
    null_fd = lift(null_fd, 3);
    if (null_fd < 0) goto fail;
    if (dup2(null_fd, 0) < 0 || dup2(null_fd, 1) < 0) goto fail;
    if (dup2(stderr_fd >= 0 ? stderr_fd : null_fd, 2) < 0) goto fail;
    /* Everything above 2 but the report pipe (close-on-exec) goes. */
    if (report > 3) syscall(SYS_close_range, 3, report - 1, 0);
    syscall(SYS_close_range, report + 1, ~0U, 0);
    execve(path, argv, environ);
fail:
    error = errno;
    write_all(report, &error, sizeof(error));
    _exit(127);
}

int vmpool_spawn_joined(const char *path, char *const argv[], const int *cgroup_fds, int count, int stderr_fd) {
    int pipe_fds[2];
    if (pipe2(pipe_fds, O_CLOEXEC) != 0) return -1;
    pid_t pid = fork();
    if (pid < 0) {
        int saved = errno;
        close(pipe_fds[0]);
        close(pipe_fds[1]);
        errno = saved;
        return -1;
    }
    if (pid == 0) {
        close(pipe_fds[0]);
        child(path, argv, cgroup_fds, count, stderr_fd, pipe_fds[1]);
    }
    close(pipe_fds[1]);
    /* EOF: the child exec'd (the pipe is close-on-exec); an int: why it did not. */
    int error = 0;
    ssize_t got;
    do {
        got = read(pipe_fds[0], &error, sizeof(error));
    } while (got < 0 && errno == EINTR);
    close(pipe_fds[0]);
    if (got == (ssize_t)sizeof(error)) {
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
        errno = error;
        return -1;
    }
    return pid;
}
