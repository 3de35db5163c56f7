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
#include <sys/syscall.h>
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

int vmpool_unix_listen(const char *path, int backlog) {
    struct sockaddr_un addr;
    size_t len = strlen(path);
    if (len >= sizeof(addr.sun_path)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0) return -1;
    memset(&addr, 0, sizeof(addr));
    addr.sun_family = AF_UNIX;
    memcpy(addr.sun_path, path, len + 1);
    if (bind(sock, (struct sockaddr *)&addr, sizeof(addr)) != 0 || listen(sock, backlog) != 0) {
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

// ---------------------------------------------------------------------------------------------
// Starting a VM's process: detached, confined, with the descriptors it is given and no others.

#include <grp.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>

// What the launched child reports when a step before exec fails: the step, then errno.
struct launch_failure {
    int step;
    int code;
};

static void launch_fail(int report, int step) {
    struct launch_failure failure = {step, errno};
    ssize_t ignored = write(report, &failure, sizeof(failure));
    (void)ignored;
    _exit(127);
}

// Runs in the grandchild, after fork in a multi-threaded process: async-signal-safe calls only.
static void launch_child(const char *path, char *const argv[], char *const envp[], const int *fds, int nfds,
                         const int *cgroup_procs, int ncg, int log_fd, long uid, long gid, int report) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    struct sigaction dfl;
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    for (int sig = 1; sig < 65; sig++) sigaction(sig, &dfl, NULL);  // EINVAL for KILL, STOP: ignored

    // Into the VM's cgroups first, so that everything the process does is accounted there.
    for (int i = 0; i < ncg; i++) {
        if (write(cgroup_procs[i], "0\n", 2) != 2) launch_fail(report, 1);
    }
    // The descriptors to keep go to 3, 4, ...: first above that range (the failure report
    // too), then down; stdio is set up in between, from descriptors not yet overwritten.
    if (nfds > 256) {
        errno = EINVAL;
        launch_fail(report, 2);
    }
    int keep_report = fcntl(report, F_DUPFD_CLOEXEC, 3 + nfds);
    if (keep_report < 0) launch_fail(report, 2);
    report = keep_report;
    int moved[256];
    for (int i = 0; i < nfds; i++) {
        moved[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, 3 + nfds);
        if (moved[i] < 0) launch_fail(report, 2);
    }
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null < 0) launch_fail(report, 3);
    int out = log_fd >= 0 ? log_fd : null;
    if (dup2(null, 0) < 0 || dup2(out, 1) < 0 || dup2(out, 2) < 0) launch_fail(report, 3);
    for (int i = 0; i < nfds; i++) {
        if (dup2(moved[i], 3 + i) < 0) launch_fail(report, 2);  // dup2 clears close-on-exec
    }
    // Everything else goes; the report is close-on-exec and goes at exec.
    if (report > 3 + nfds && syscall(SYS_close_range, 3 + nfds, report - 1, 0) != 0) launch_fail(report, 2);
    if (syscall(SYS_close_range, report + 1, ~0U, 0) != 0) launch_fail(report, 2);

    if (chdir("/") != 0) launch_fail(report, 4);
    umask(077);
    // No core dump: it would hold the guest's memory.
    struct rlimit none_core = {0, 0};
    setrlimit(RLIMIT_CORE, &none_core);
    if (uid >= 0 || gid >= 0) {
        if (setgroups(0, NULL) != 0) launch_fail(report, 5);
        if (gid >= 0 && setresgid((gid_t)gid, (gid_t)gid, (gid_t)gid) != 0) launch_fail(report, 5);
        if (uid >= 0 && setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) != 0) launch_fail(report, 5);
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) launch_fail(report, 6);
    execve(path, argv, envp);
    launch_fail(report, 7);
}

int vmpool_launch(const char *path, char *const argv[], char *const envp[], const int *fds, int nfds,
                  const int *cgroup_procs, int ncg, int log_fd, long uid, long gid, int *pid_out,
                  int *failed_step) {
    int pipefd[2];
    if (pipe2(pipefd, O_CLOEXEC) != 0) return -1;
    *failed_step = 0;
    pid_t first = fork();
    if (first < 0) {
        int saved = errno;
        close(pipefd[0]);
        close(pipefd[1]);
        errno = saved;
        return -1;
    }
    if (first == 0) {
        // A session of its own, then a grandchild that is no session leader and outlives us.
        close(pipefd[0]);
        if (setsid() < 0) launch_fail(pipefd[1], 8);
        pid_t second = fork();
        if (second < 0) launch_fail(pipefd[1], 8);
        if (second == 0) {
            launch_child(path, argv, envp, fds, nfds, cgroup_procs, ncg, log_fd, uid, gid, pipefd[1]);
        }
        struct launch_failure started = {0, (int)second};
        ssize_t ignored = write(pipefd[1], &started, sizeof(started));
        (void)ignored;
        _exit(0);
    }
    close(pipefd[1]);
    struct launch_failure message;
    int pid = -1;
    int rc = 0;
    for (;;) {
        ssize_t n = read(pipefd[0], &message, sizeof(message));
        if (n < 0 && errno == EINTR) continue;
        if (n == 0) break;  // every writer closed: the exec happened
        if (n != sizeof(message)) {
            rc = -1;
            errno = EPROTO;
            break;
        }
        if (message.step == 0) {
            pid = message.code;
            continue;
        }
        *failed_step = message.step;
        errno = message.code;
        rc = -1;
        break;
    }
    int saved = errno;
    close(pipefd[0]);
    int status;
    while (waitpid(first, &status, 0) < 0 && errno == EINTR) {
    }
    if (rc == 0 && pid <= 0) {
        saved = ECHILD;
        rc = -1;
    }
    errno = saved;
    if (rc == 0) *pid_out = pid;
    return rc;
}

#include <sys/mman.h>
#include <sys/sendfile.h>

int vmpool_memfd(const char *name) { return memfd_create(name, MFD_CLOEXEC); }

int vmpool_memfd_copy(int fd, const char *name) {
    struct stat info;
    if (fstat(fd, &info) != 0) return -1;
    int copy = memfd_create(name, MFD_CLOEXEC);
    if (copy < 0) return -1;
    off_t offset = 0;
    while (offset < info.st_size) {
        ssize_t sent = sendfile(copy, fd, &offset, (size_t)(info.st_size - offset));
        if (sent < 0 && errno == EINTR) continue;
        if (sent <= 0) {
            int saved = sent < 0 ? errno : EIO;
            close(copy);
            errno = saved;
            return -1;
        }
    }
    return copy;
}

#include <linux/if.h>
#include <linux/if_tun.h>
#include <sys/ioctl.h>

int vmpool_tap_open(const char *name) {
    if (strlen(name) >= IFNAMSIZ) {
        errno = ENAMETOOLONG;
        return -1;
    }
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0) return -1;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    memcpy(ifr.ifr_name, name, strlen(name));
    if (ioctl(fd, TUNSETIFF, &ifr) != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

int vmpool_memfd_copy_sparse(int fd, const char *name) {
    struct stat info;
    if (fstat(fd, &info) != 0) return -1;
    int copy = memfd_create(name, MFD_CLOEXEC);
    if (copy < 0) return -1;
    size_t size = 1 << 20;
    char *buffer = malloc(size);
    if (!buffer || ftruncate(copy, info.st_size) != 0) goto fail;
    off_t data = 0;
    for (;;) {
        data = lseek(fd, data, SEEK_DATA);
        if (data < 0) {
            if (errno == ENXIO) break;  // no data past here: the rest stays a hole
            goto fail;
        }
        off_t hole = lseek(fd, data, SEEK_HOLE);
        if (hole < 0) goto fail;
        while (data < hole) {
            size_t want = (size_t)(hole - data) < size ? (size_t)(hole - data) : size;
            ssize_t got = pread(fd, buffer, want, data);
            if (got < 0 && errno == EINTR) continue;
            if (got <= 0) goto fail;
            for (ssize_t done = 0; done < got;) {
                ssize_t put = pwrite(copy, buffer + done, (size_t)(got - done), data + done);
                if (put < 0 && errno == EINTR) continue;
                if (put <= 0) goto fail;
                done += put;
            }
            data += got;
        }
    }
    free(buffer);
    return copy;
fail:;
    int saved = errno;
    free(buffer);
    close(copy);
    errno = saved;
    return -1;
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

long long vmpool_copy_file(int in, int out) {
    long long total = 0;
    for (;;) {
        ssize_t copied = copy_file_range(in, NULL, out, NULL, (size_t)1 << 30, 0);
        if (copied == 0) return total;
        if (copied > 0) {
            total += copied;
            continue;
        }
        if (errno == EINTR) continue;
        if (errno != EXDEV && errno != ENOSYS && errno != EINVAL && errno != EOPNOTSUPP) return -1;
        break;  // not between these file systems: copy through a buffer
    }
    char buffer[1 << 16];
    for (;;) {
        ssize_t got = read(in, buffer, sizeof buffer);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) return -1;
        if (got == 0) return total;
        for (ssize_t done = 0; done < got;) {
            ssize_t put = write(out, buffer + done, (size_t)(got - done));
            if (put < 0 && errno == EINTR) continue;
            if (put <= 0) return -1;
            done += put;
        }
        total += got;
    }
}
