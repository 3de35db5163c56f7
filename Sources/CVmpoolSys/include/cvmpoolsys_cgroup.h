#ifndef CVMPOOLSYS_CGROUP_H
#define CVMPOOLSYS_CGROUP_H

/// Moves the calling process into a cgroup on each hierarchy by writing "0" to each of the
/// `count` descriptors, each open (O_WRONLY) on a cgroup's `cgroup.procs`. Async-signal-safe
/// (only write(2)), so the child of a multi-threaded parent may call it between fork and exec.
/// Returns 0, or -1 with errno set and the failing descriptor's index in `*failed` (when not
/// NULL); the hierarchies before it were joined.
int vmpool_cgroup_join(const int *fds, int count, int *failed);

/// Starts `path` with `argv` (NULL-terminated) joined to the cgroups whose `cgroup.procs` are
/// open on `cgroup_fds` before it runs a single instruction of its own: fork, then in the child
/// vmpool_cgroup_join, a new session, stdin and stdout on /dev/null, stderr on `stderr_fd`
/// (or /dev/null when -1), every other descriptor closed, default signal handling, exec; the
/// child calls only async-signal-safe functions. Returns the child's pid once it has exec'd, or
/// -1 with errno set when it could not join a cgroup or exec (the child is reaped then).
int vmpool_spawn_joined(const char *path, char *const argv[], const int *cgroup_fds, int count, int stderr_fd);

#endif
