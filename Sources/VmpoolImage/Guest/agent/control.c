#include "agent.h"

#include <sched.h>

// ---------------------------------------------------------------------------------------------
// Control requests

static void hello(struct port *p, const char *id, char **args, int nargs) {
    const char *time_s = NULL, *seed_s = NULL, *name_s = NULL, *machine_s = NULL, *net_s = NULL;
    int positional = 0;
    for (int i = 0; i < nargs; i++) {
        char *eq = strchr(args[i], '=');
        const char **slot = NULL;
        if (!eq) {
            // The older form: `hello SEC.FRAC HEX`.
            slot = positional == 0 ? &time_s : positional == 1 ? &seed_s : NULL;
            positional++;
            if (!slot) {
                answer(p, id, "error", "too many arguments");
                return;
            }
            *slot = args[i];
            continue;
        }
        *eq = 0;
        const char *key = args[i], *value = eq + 1;
        if (strcmp(key, "time") == 0) slot = &time_s;
        else if (strcmp(key, "seed") == 0) slot = &seed_s;
        else if (strcmp(key, "name") == 0) slot = &name_s;
        else if (strcmp(key, "machine") == 0) slot = &machine_s;
        else if (strcmp(key, "net") == 0) slot = &net_s;
        if (!slot) {
            char msg[80];
            snprintf(msg, sizeof msg, "unknown key %.40s", key);
            answer(p, id, "error", msg);
            return;
        }
        *slot = value;
    }
    struct timespec ts;
    struct netconf nc;
    const char *invalid = NULL;
    if (time_s && parse_time(time_s, &ts) != 0) invalid = "invalid time";
    else if (seed_s && !valid_hex(seed_s)) invalid = "invalid hex";
    else if (name_s && !valid_hostname(name_s)) invalid = "invalid name";
    else if (machine_s && !valid_machine_id(machine_s)) invalid = "invalid machine id";
    else if (net_s && parse_net(net_s, &nc) != 0) invalid = "invalid net";
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
    if (time_s && clock_settime(CLOCK_REALTIME, &ts) != 0)
        snprintf(err, sizeof err, "cannot set the clock: %s", strerror(errno));
    else if (seed_s && seed(seed_s) != 0)
        snprintf(err, sizeof err, "cannot seed the RNG");
    else if (name_s && set_hostname(name_s, err, sizeof err) != 0) {
    } else if (machine_s && set_machine_id(machine_s, err, sizeof err) != 0) {
    } else if (net_s && configure_net(&nc, &announce_at, err, sizeof err) != 0) {
    }
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
