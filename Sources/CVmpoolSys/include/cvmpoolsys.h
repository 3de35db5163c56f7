#ifndef CVMPOOLSYS_H
#define CVMPOOLSYS_H

#include <stddef.h>
#include <sys/types.h>

/// Sends `len` bytes of `data` on the Unix socket `sock` with the file descriptor `fd`
/// attached (SCM_RIGHTS). Returns the bytes sent, or -1 with errno set.
ssize_t vmpool_send_with_fd(int sock, const void *data, size_t len, int fd);

/// Connects a new SOCK_STREAM Unix socket to `path` with O_CLOEXEC set. Returns the socket,
/// or -1 with errno set (ENAMETOOLONG when the path does not fit sun_path).
int vmpool_unix_connect(const char *path);

/// Like vmpool_unix_connect with extra socket flags (SOCK_NONBLOCK: a server whose backlog
/// is full fails the connect with EAGAIN instead of blocking).
int vmpool_unix_connect_flags(const char *path, int flags);

/// A SOCK_STREAM Unix socket bound to `path` and listening, close-on-exec; -1 with errno set.
int vmpool_unix_listen(const char *path, int backlog);

/// Starts `path` with `argv` (NULL-terminated) in a new session: stdin and stdout on
/// /dev/null, stderr on `stderr_fd` (or /dev/null when -1), every other descriptor closed.
/// Returns the child's pid, or -1 with errno set.
int vmpool_spawn(const char *path, char *const argv[], int stderr_fd);

/// Like vmpool_spawn, with an environment (NULL: this process's), stdout on `stdout_fd` and
/// stderr on `stderr_fd` (-1: /dev/null), in this process's session.
int vmpool_spawn_env(const char *path, char *const argv[], char *const envp[], int stdout_fd, int stderr_fd);

/// Like vmpool_spawn_env with stdin on `stdin_fd` (-1: /dev/null).
int vmpool_spawn_io(const char *path, char *const argv[], char *const envp[], int stdin_fd, int stdout_fd,
                    int stderr_fd);

/// Waits for child `pid` to exit (retrying on EINTR); returns its exit status, 128 + the signal
/// that killed it, or -1 when it cannot be waited for.
int vmpool_wait(int pid);

/// Opens a pseudo-terminal pair; returns the master and writes the slave's path into `name`.
int vmpool_open_pty(char *name, size_t size);

/// pipe2(fds, O_CLOEXEC).
int vmpool_pipe_cloexec(int fds[2]);
/// Starts `path` with `argv` and `keep[0]`, `keep[1]` as its descriptors 3 and 4 (tests hand
/// socketpair ends to a child this way); descriptors above 4 are closed.
int vmpool_spawn_inherit(const char *path, char *const argv[], const int keep[2]);

/// Gives back the allocated 4 KiB pages of the file open on `fd` (read-write) that hold only
/// zeros: each run of them becomes a hole (fallocate PUNCH_HOLE, size kept), which reads as
/// zeros, so no reader of the file, mapped or not, sees a byte change. Returns the bytes
/// given back, or -errno (what was punched before the error stays punched).
long long vmpool_punch_zero_pages(int fd);

/// Starts `path` with `argv` and `envp` detached from this process (a session of its own,
/// re-parented away once this returns), confined before exec: it joins the cgroups whose
/// `cgroup.procs` are open on `cgroup_procs` (by writing "0" into each), gets `fds[i]` as
/// its descriptor 3 + i and no other above 2, stdin on /dev/null and stdout and stderr on
/// `log_fd` (-1: /dev/null), no core dumps, the gid and uid given (-1: unchanged; with either,
/// no supplementary groups), no new privileges, cwd /. Returns 0 with the pid in `pid_out`
/// once the exec happened, or -1 with errno set and `failed_step` saying which step failed
/// (1 cgroup, 2 descriptors, 3 stdio, 4 cwd, 5 uid/gid, 6 no_new_privs, 7 exec, 8 fork).
int vmpool_launch(const char *path, char *const argv[], char *const envp[], const int *fds, int nfds,
                  const int *cgroup_procs, int ncg, int log_fd, long uid, long gid, int *pid_out,
                  int *failed_step);

/// An empty memfd (close-on-exec); -1 with errno set.
int vmpool_memfd(const char *name);

/// A memfd (close-on-exec) holding a copy of the whole file open on `fd`; -1 with errno set.
int vmpool_memfd_copy(int fd, const char *name);

/// Attaches to the tap device `name` (a persistent one vmpool made) with a vnet header, as
/// QEMU's tap backend would; returns the descriptor (close-on-exec), or -1 with errno set.
int vmpool_tap_open(const char *name);

/// A memfd (close-on-exec) of the same size as the file open on `fd` holding a copy of its
/// data; the file's holes stay holes (no memory). -1 with errno set.
int vmpool_memfd_copy_sparse(int fd, const char *name);
/// Copies what is left of `in` to `out` (copy_file_range, else through a buffer); bytes copied, or -1.
long long vmpool_copy_file(int in, int out);

/// renameat2(..., RENAME_NOREPLACE): fails with EEXIST instead of replacing what is at `newpath`.
int vmpool_rename_noreplace(int olddirfd, const char *oldpath, int newdirfd, const char *newpath);

/// fcntl(fd, F_SETPIPE_SZ, size): a larger pipe buffer; returns the new size or -1 with errno set.
int vmpool_set_pipe_size(int fd, int size);

/// Makes each of `signals` write its number as one byte into a pipe (non-blocking, close on
/// exec) instead of its default action, and returns the pipe's read end, or -1 with errno set.
/// A waiting thread polls that descriptor: it needs no dispatch source and no free thread of
/// Swift's pool to learn of the signal.
int vmpool_trap_signals(const int *signals, int count);
#endif
