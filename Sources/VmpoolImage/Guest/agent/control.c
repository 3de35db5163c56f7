// vmpool guest agent, control requests (Q frames) and hello (see agent.h).
#include "agent.h"

#include <sched.h>

// ---------------------------------------------------------------------------------------------
// Control requests

// The arguments of hello, pointing into the request; NULL when not given.
struct hello_args {
    const char *time, *seed, *name, *machine, *net;
};

// Sorts hello's arguments (KEY=VALUE, or the older positional `SEC.FRAC HEX`) into `a`; NULL,
// or the error to answer (possibly written to `msg`).
static const char *hello_args(char **args, int nargs, struct hello_args *a, char *msg, size_t size) {
    int positional = 0;
    for (int i = 0; i < nargs; i++) {
        char *eq = strchr(args[i], '=');
        const char **slot = NULL;
        if (!eq) {
            // The older form: `hello SEC.FRAC HEX`.
            slot = positional == 0 ? &a->time : positional == 1 ? &a->seed : NULL;
            positional++;
            if (!slot) return "too many arguments";
            *slot = args[i];
            continue;
        }
        *eq = 0;
        const char *key = args[i], *value = eq + 1;
        if (strcmp(key, "time") == 0) slot = &a->time;
        else if (strcmp(key, "seed") == 0) slot = &a->seed;
        else if (strcmp(key, "name") == 0) slot = &a->name;
        else if (strcmp(key, "machine") == 0) slot = &a->machine;
        else if (strcmp(key, "net") == 0) slot = &a->net;
        if (!slot) {
            snprintf(msg, size, "unknown key %.40s", key);
            return msg;
        }
        *slot = value;
    }
    return NULL;
}

// Validates every argument before anything is applied; NULL or the error to answer.
static const char *hello_check(const struct hello_args *a, struct timespec *ts, struct netconf *nc) {
    if (a->time && parse_time(a->time, ts) != 0) return "invalid time";
    if (a->seed && !valid_hex(a->seed)) return "invalid hex";
    if (a->name && !valid_hostname(a->name)) return "invalid name";
    if (a->machine && !valid_machine_id(a->machine)) return "invalid machine id";
    if (a->net && parse_net(a->net, nc) != 0) return "invalid net";
    return NULL;
}

// Applies the arguments in order, stopping at the first that fails (its error in `err`).
static void hello_apply(const struct hello_args *a, const struct timespec *ts, const struct netconf *nc,
                        int *announce_at, char *err, size_t errlen) {
    if (a->time && clock_settime(CLOCK_REALTIME, ts) != 0)
        snprintf(err, errlen, "cannot set the clock: %s", strerror(errno));
    else if (a->seed && seed(a->seed) != 0)
        snprintf(err, errlen, "cannot seed the RNG");
    else if (a->name && set_hostname(a->name, err, errlen) != 0) {
    } else if (a->machine && set_machine_id(a->machine, err, errlen) != 0) {
    } else if (a->net && configure_net(nc, announce_at, err, errlen) != 0) {
    }
}

static void hello(struct port *p, const char *id, char **args, int nargs) {
    struct hello_args a = {0};
    struct timespec ts;
    struct netconf nc;
    char msg[80];
    const char *invalid = hello_args(args, nargs, &a, msg, sizeof msg);
    if (!invalid) invalid = hello_check(&a, &ts, &nc);
    if (invalid) {
        answer(p, id, "error", invalid);
        return;
    }
    char err[256] = "";
    int announce_at = 0;
    // While it applies an identity the agent runs first: the clock step and the new hostname
    // wake systemd (it re-arms its timers, re-reads the hostname), which would otherwise
    // preempt the agent, and in a fresh clone that is code QEMU translates for the first time
    // (tens of ms under TCG) before the host hears the answer. systemd's reaction still runs,
    // right after the answer. Commands are never started from here (and would not inherit it).
    struct sched_param first = {.sched_priority = 1};
    int raised = sched_setscheduler(0, SCHED_FIFO | SCHED_RESET_ON_FORK, &first) == 0;
    hello_apply(&a, &ts, &nc, &announce_at, err, sizeof err);
    if (*err) answer(p, id, "error", err);
    else answer(p, id, "ok", "pong");
    port_flush(p);  // the answer first: the host counts the clone ready on it
    if (raised) {
        struct sched_param none = {0};
        sched_setscheduler(0, SCHED_BATCH, &none);
    }
    if (announce_at) announce(announce_at, nc.mac, nc.addr);
}

void control(struct port *p, char *text) {
    char *save = NULL;
    char *args[16];
    int n = 0;
    for (char *tok = strtok_r(text, " \t\r\n", &save); tok && n < 16; tok = strtok_r(NULL, " \t\r\n", &save))
        args[n++] = tok;
    if (n == 0) return;
    const char *id = args[0];
    const char *cmd = n > 1 ? args[1] : NULL;
    if (!cmd) {
        answer(p, id, "error", "missing command");
    } else if (strcmp(cmd, "ping") == 0) {
        answer(p, id, "ok", "pong");
    } else if (strcmp(cmd, "info") == 0) {
        info(p, id);
    } else if (strcmp(cmd, "online") == 0) {
        online_all("/sys/devices/system/memory", "memory", "state", "offline", "online");
        online_all("/sys/devices/system/cpu", "cpu", "online", "0", "1");
        info(p, id);
    } else if (strcmp(cmd, "time") == 0) {
        struct timespec ts;
        if (n < 3 || parse_time(args[2], &ts) != 0) {
            answer(p, id, "error", "invalid time");
        } else if (clock_settime(CLOCK_REALTIME, &ts) != 0) {
            char err[128];
            snprintf(err, sizeof err, "cannot set the clock: %s", strerror(errno));
            answer(p, id, "error", err);
        } else {
            answer(p, id, "ok", NULL);
        }
    } else if (strcmp(cmd, "seed") == 0) {
        if (n < 3 || !valid_hex(args[2])) answer(p, id, "error", "invalid hex");
        else if (seed(args[2]) != 0) answer(p, id, "error", "cannot seed the RNG");
        else answer(p, id, "ok", NULL);
    } else if (strcmp(cmd, "hello") == 0) {
        hello(p, id, args + 2, n - 2);
    } else {
        answer(p, id, "error", "unknown command");
    }
}
