// vmpool guest agent, commands: the C request, fork and exec, pty, stdin, output, exit status (see agent.h).
#include "agent.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#include <sched.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/personality.h>
#include <sys/wait.h>
#include <termios.h>

extern char **environ;

static const char *const default_env[] = {
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root",
};

// A root disk vmpool made from an image (image build --from) carries the image's defaults for
// commands in this file: lines `env KEY=VALUE` and `workdir PATH` (and `user NAME`, not used:
// commands run as root, as on every vmpool guest).
#define IMAGE_CONFIG "/.vmpool/image-config"
#define IMAGE_ENV_MAX 256
// Where the initramfs put its busybox (and this agent) for a root disk without an agent of its
// own; the applets come last on the default PATH, so that `cp` (sh and tar) works on any image.
#define CARRIED_BUSYBOX "/.vmpool/guest/bin/busybox"
#define CARRIED_PATH ":/.vmpool/guest/bin:/.vmpool/guest/sbin:/.vmpool/guest/usr/bin:/.vmpool/guest/usr/sbin"

// The environment and working directory a command starts with unless the host says otherwise.
static char *base_env[IMAGE_ENV_MAX + 4];
static size_t nbase;
static const char *base_cwd = "/";
static int base_cwd_from_image;

// ---------------------------------------------------------------------------------------------
// Commands

// Sets KEY=VALUE in base_env, replacing an entry with the same key.
static void base_env_set(char *entry) {
    char *eq = entry ? strchr(entry, '=') : NULL;
    if (!eq || eq == entry) return;
    size_t klen = (size_t)(eq - entry) + 1;
    for (size_t k = 0; k < nbase; k++) {
        if (strncmp(base_env[k], entry, klen) == 0) {
            base_env[k] = entry;
            return;
        }
    }
    if (nbase < sizeof base_env / sizeof base_env[0]) base_env[nbase++] = entry;
}

// The defaults: the agent's own, then the image's (IMAGE_CONFIG), then the carried busybox's
// applets at the end of PATH. Lines longer than 4 KiB are skipped.
void load_defaults(void) {
    for (size_t i = 0; i < sizeof default_env / sizeof default_env[0]; i++) base_env_set(strdup(default_env[i]));
    FILE *f = fopen(IMAGE_CONFIG, "re");
    if (f) {
        char line[4096];
        int n = 0;
        while (n < IMAGE_ENV_MAX && fgets(line, sizeof line, f)) {
            size_t len = strlen(line);
            if (len > 0 && line[len - 1] == '\n') {
                line[--len] = 0;
            } else if (!feof(f)) {
                int c;
                while ((c = fgetc(f)) != EOF && c != '\n') {
                }
                continue;
            }
            if (strncmp(line, "env ", 4) == 0) {
                base_env_set(strdup(line + 4));
                n++;
            } else if (strncmp(line, "workdir /", 9) == 0) {
                base_cwd = strdup(line + 8);
                base_cwd_from_image = base_cwd != NULL;
                if (!base_cwd) base_cwd = "/";
            }
        }
        fclose(f);
    }
    if (access(CARRIED_BUSYBOX, X_OK) == 0) {
        for (size_t k = 0; k < nbase; k++) {
            if (strncmp(base_env[k], "PATH=", 5) != 0) continue;
            size_t len = strlen(base_env[k]) + sizeof CARRIED_PATH;
            char *path = malloc(len);
            if (path) {
                snprintf(path, len, "%s%s", base_env[k], CARRIED_PATH);
                base_env[k] = path;
            }
        }
    }
}

void job_free(struct port *p) {
    struct job *j = p->job;
    if (!j) return;
    close_fd(&j->status_fd);
    close_fd(&j->out_fd);
    close_fd(&j->err_fd);
    close_fd(&j->in_fd);
    free(j);
    p->job = NULL;
    if (p->blocked == BLOCK_STDIN) p->blocked = BLOCK_NONE;
}

void job_signal(struct job *j, int sig) {
    if (j->pid <= 0) return;
    if (kill(-j->pid, sig) != 0 && !j->exited) kill(j->pid, sig);
}

// What the child reports on the status pipe when it cannot run the command.
struct child_error {
    int stage;  // 1: stdin or terminal, 2: exec, 3: working directory
    int err;
};

static void child_fail(int fd, int stage) {
    struct child_error ce = {stage, errno};
    ssize_t rc = write(fd, &ce, sizeof ce);
    (void)rc;
    _exit(127);
}

// Whether the guest runs under QEMU's software emulation (TCG), whose CPUID hypervisor
// signature is "TCGTCGTCGTCG". TCG finds translated code by virtual address: a process whose
// libraries are mapped somewhere new at every start (ASLR) has the dynamic loader and libc
// translated again each time. Measured on the Debian guest: /bin/true from a shell loop,
// 29-32 ms each with randomization, 10-12 ms without. Under KVM nothing is translated.
int under_tcg(void) {
#if defined(__x86_64__) || defined(__i386__)
    unsigned a, b, c, d;
    __cpuid(1, a, b, c, d);
    if (!(c >> 31 & 1)) return 0;  // no hypervisor
    __cpuid(0x40000000, a, b, c, d);
    char sig[12];
    memcpy(sig, &b, 4);
    memcpy(sig + 4, &c, 4);
    memcpy(sig + 8, &d, 4);
    return memcmp(sig, "TCGTCGTCGTCG", 12) == 0;
#else
    return 0;
#endif
}

// A parsed C frame; the strings point into the frame's payload.
struct request {
    char **argv;
    char **envp;
    const char *cwd;
    const char *tty;
    struct winsize ws;
    int want_stdin;
    int keep_layout;  // VMPOOL_ASLR=1 in the command's environment
    int cwd_default;  // cwd is the image's WorkingDir: "/" if it does not exist
};

// Parses a C payload (entries of a tag byte and a NUL-terminated string); NULL or why not.
static const char *parse_request(unsigned char *payload, size_t len, struct request *rq) {
    size_t nargv = 0, nenv = 0;
    for (size_t at = 0; at < len;) {
        unsigned char tag = payload[at];
        size_t rest = len - at - 1;
        unsigned char *nul = rest ? memchr(payload + at + 1, 0, rest) : NULL;
        if (!nul) return "bad request: unterminated entry";
        if (tag == 'a') nargv++;
        else if (tag == 'e') nenv++;
        else if (tag != 'd' && tag != 't' && tag != 'i') return "bad request: unknown entry";
        at = (size_t)(nul - payload) + 1;
    }
    if (nargv == 0) return "bad request: no argv";
    rq->argv = calloc(nargv + 1, sizeof *rq->argv);
    rq->envp = calloc(nenv + nbase + 2, sizeof *rq->envp);
    if (!rq->argv || !rq->envp) return "out of memory";
    size_t na = 0, ne = 0;
    for (size_t i = 0; i < nbase; i++) rq->envp[ne++] = base_env[i];
    rq->cwd = base_cwd;
    rq->cwd_default = base_cwd_from_image;
    for (size_t at = 0; at < len;) {
        unsigned char tag = payload[at];
        char *value = (char *)payload + at + 1;
        at += 1 + strlen(value) + 1;
        if (tag == 'a') {
            rq->argv[na++] = value;
        } else if (tag == 'e') {
            char *eq = strchr(value, '=');
            if (!eq || eq == value) return "bad request: environment entry without KEY=";
            size_t klen = (size_t)(eq - value) + 1;  // the key and its '='
            size_t k = 0;
            while (k < ne && strncmp(rq->envp[k], value, klen) != 0) k++;
            rq->envp[k] = value;
            if (k == ne) ne++;
            if (strncmp(value, "VMPOOL_ASLR=", 12) == 0) rq->keep_layout = strcmp(value + 12, "1") == 0;
        } else if (tag == 'd') {
            if (!*value) return "bad request: empty working directory";
            rq->cwd = value;
            rq->cwd_default = 0;
        } else if (tag == 't') {
            rq->tty = value;
            if (parse_size(value, &rq->ws.ws_row, &rq->ws.ws_col) != 0) return "bad request: tty size";
        } else if (tag == 'i') {
            if (strcmp(value, "1") == 0) rq->want_stdin = 1;
            else if (strcmp(value, "0") != 0) return "bad request: stdin flag";
        }
    }
    if (rq->tty) {
        size_t k = 0;
        while (k < ne && strncmp(rq->envp[k], "TERM=", 5) != 0) k++;
        if (k == ne) rq->envp[ne++] = "TERM=xterm";
    }
    return NULL;
}

// The descriptors a command is started with: the exec status pipe, then the pty master and
// its slave's name, or pipes for stdout, stderr and (when forwarded) stdin.
struct channels {
    int status[2], out[2], err[2], in[2];
    int master;
    char slave[64];
};

// Opens the channels `rq` asks for; NULL or what failed.
static const char *channels_open(struct request *rq, struct channels *c) {
    if (pipe2(c->status, O_CLOEXEC) != 0) return "pipe";
    if (rq->tty) {
        c->master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (c->master < 0 || grantpt(c->master) != 0 || unlockpt(c->master) != 0 ||
            ptsname_r(c->master, c->slave, sizeof c->slave) != 0)
            return "pty";
        ioctl(c->master, TIOCSWINSZ, &rq->ws);
        return NULL;
    }
    if (pipe2(c->out, O_CLOEXEC) != 0 || pipe2(c->err, O_CLOEXEC) != 0 ||
        (rq->want_stdin && pipe2(c->in, O_CLOEXEC) != 0))
        return "pipe";
    return NULL;
}

// In the forked child: the command's signals, session, terminal or pipes, directory and address
// layout, then exec. Does not return.
static void child_run(struct request *rq, struct channels *c) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    // Every disposition back to its default: a signal the agent was started with ignored
    // (SIGINT and SIGQUIT are, under a shell's background job) must reach the command.
    for (int sig = 1; sig < NSIG; sig++) {
        if (sig != SIGKILL && sig != SIGSTOP) signal(sig, SIG_DFL);
    }
    struct sched_param sp = {0};
    sched_setscheduler(0, SCHED_OTHER, &sp);
    setsid();
    if (rq->tty) {
        int fd = open(c->slave, O_RDWR);  // the session's controlling terminal
        if (fd < 0) child_fail(c->status[1], 1);
        ioctl(fd, TIOCSCTTY, 0);
        dup2(fd, 0);
        dup2(fd, 1);
        dup2(fd, 2);
        if (fd > 2) close(fd);
    } else {
        int fd0 = rq->want_stdin ? c->in[0] : open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (fd0 < 0) child_fail(c->status[1], 1);
        dup2(fd0, 0);
        dup2(c->out[1], 1);
        dup2(c->err[1], 2);
    }
    if (chdir(rq->cwd) != 0 && (!rq->cwd_default || chdir("/") != 0)) child_fail(c->status[1], 3);
    // Under TCG commands (and what they start) get a fixed address-space layout, unless
    // the request asks for randomization (VMPOOL_ASLR=1): see under_tcg.
    if (fixed_layout && !rq->keep_layout) {
        int persona = personality(0xffffffff);
        if (persona != -1) personality((unsigned long)persona | ADDR_NO_RANDOMIZE);
    }
    environ = rq->envp;  // execvp searches the PATH of the new environment
    execvp(rq->argv[0], rq->argv);
    child_fail(c->status[1], 2);
}

// In the agent, once the command is forked: its ends of the channels become the job's.
static void job_attach(struct job *j, struct request *rq, pid_t pid, struct channels *c) {
    j->pid = pid;
    j->status_fd = c->status[0];
    j->pty = rq->tty != NULL;
    if (j->pty) {
        j->out_fd = c->master;
        j->err_fd = -1;
        j->in_fd = fcntl(c->master, F_DUPFD_CLOEXEC, 3);
    } else {
        j->out_fd = c->out[0];
        j->err_fd = c->err[0];
        j->in_fd = c->in[1];
        fcntl(c->out[0], F_SETPIPE_SZ, PIPE_SIZE);
        fcntl(c->err[0], F_SETPIPE_SZ, PIPE_SIZE);
    }
    set_nonblock(j->status_fd);
    set_nonblock(j->out_fd);
    if (j->err_fd >= 0) set_nonblock(j->err_fd);
    if (j->in_fd >= 0) set_nonblock(j->in_fd);
    snprintf(j->argv0, sizeof j->argv0, "%s", rq->argv[0]);
    snprintf(j->cwd, sizeof j->cwd, "%s", rq->cwd);
}

// Forks the command of `rq`; fills `j` or returns why not.
static const char *launch(struct request *rq, struct job *j) {
    struct channels c = {.status = {-1, -1}, .out = {-1, -1}, .err = {-1, -1}, .in = {-1, -1}, .master = -1};
    const char *fail = channels_open(rq, &c);
    pid_t pid = -1;
    if (!fail) {
        pid = fork();
        if (pid < 0) fail = "fork";
    }
    if (pid == 0) child_run(rq, &c);
    int saved = errno;
    close_fd(&c.status[1]);
    close_fd(&c.out[1]);
    close_fd(&c.err[1]);
    close_fd(&c.in[0]);
    if (fail) {
        close_fd(&c.status[0]);
        close_fd(&c.out[0]);
        close_fd(&c.err[0]);
        close_fd(&c.in[1]);
        close_fd(&c.master);
        errno = saved;
        return fail;
    }
    job_attach(j, rq, pid, &c);
    return NULL;
}

void start_command(struct port *p, unsigned char *payload, size_t len) {
    if (p->job) {
        exit_error(p, 125, "busy");
        return;
    }
    struct request rq = {0};
    const char *bad = parse_request(payload, len, &rq);
    struct job *j = NULL;
    if (!bad) {
        j = calloc(1, sizeof *j);
        if (!j) {
            bad = "out of memory";
        } else {
            const char *fail = launch(&rq, j);
            if (fail) {
                static char msg[96];
                snprintf(msg, sizeof msg, "%s: %s", fail, strerror(errno));
                bad = msg;
                free(j);
                j = NULL;
            }
        }
    }
    free(rq.argv);
    free(rq.envp);
    if (bad) exit_error(p, 125, bad);
    else p->job = j;
}

// The exec status pipe is readable: EOF alone means the command runs.
void job_status(struct job *j) {
    struct child_error ce;
    ssize_t n = read(j->status_fd, &ce, sizeof ce);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    close_fd(&j->status_fd);
    if (n != (ssize_t)sizeof ce) {
        j->exec_ok = 1;
        return;
    }
    j->fail_code = ce.stage == 2 && ce.err == ENOENT ? 127 : 126;
    const char *what = ce.stage == 2 ? "exec" : ce.stage == 3 ? "chdir" : "stdin";
    snprintf(j->fail_msg, sizeof j->fail_msg, "%s %s: %s", what, ce.stage == 3 ? j->cwd : j->argv0,
             strerror(ce.err));
}

// Reads command output into the port's ring as frames of `type`.
void job_read(struct port *p, int *fd, unsigned char type) {
    for (int round = 0; round < 8 && *fd >= 0; round++) {
        size_t room = out_free(p);
        if (room < OUT_RESERVE + FRAME_HEADER + MIN_READ) return;
        size_t want = room - OUT_RESERVE - FRAME_HEADER;
        if (want > MAX_OUT_PAYLOAD) want = MAX_OUT_PAYLOAD;
        struct iovec iov[2];
        int cnt = ring_iov(p, p->out_tail + FRAME_HEADER, want, iov);
        ssize_t n = readv(*fd, iov, cnt);
        if (n > 0) {
            unsigned char h[FRAME_HEADER];
            h[0] = type;
            put32(h + 1, (uint32_t)n);
            out_put(p, h, sizeof h);  // the header goes in front of the bytes just read
            p->out_tail += (size_t)n;
            if ((size_t)n < want) return;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        close_fd(fd);  // EOF, or EIO from a pty whose slave side is closed
    }
}

// Sends S and X when due, and frees a finished job.
void job_progress(struct port *p) {
    struct job *j = p->job;
    if (!j || out_free(p) < 512) return;
    if (j->fail_code) {
        exit_error(p, j->fail_code, j->fail_msg);
        job_free(p);
        return;
    }
    if (j->exec_ok && !j->started) {
        char pid[16];
        int n = snprintf(pid, sizeof pid, "%d", (int)j->pid);
        out_frame(p, 'S', pid, (size_t)n);
        j->started = 1;
    }
    if (j->started && j->exited && j->out_fd < 0 && j->err_fd < 0) {
        char text[32];
        int n = WIFSIGNALED(j->status) ? snprintf(text, sizeof text, "signal %d", WTERMSIG(j->status))
                                        : snprintf(text, sizeof text, "exit %d", WEXITSTATUS(j->status));
        out_frame(p, 'X', text, (size_t)n);
        job_free(p);
    }
}

void job_stdin_close(struct job *j) {
    if (j->in_fd < 0) return;
    if (j->pty) {
        // A pty has no half-close: send the EOF character instead.
        struct termios tio;
        unsigned char eof = 4;
        if (tcgetattr(j->in_fd, &tio) == 0 && tio.c_cc[VEOF]) eof = tio.c_cc[VEOF];
        ssize_t rc = write(j->in_fd, &eof, 1);
        (void)rc;
    }
    close_fd(&j->in_fd);
}

void reap(void) {
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid <= 0) return;
        for (int i = 0; i < nports; i++) {
            struct job *j = ports[i]->job;
            if (j && j->pid == pid) {
                j->exited = 1;
                j->status = status;
            }
        }
    }
}
