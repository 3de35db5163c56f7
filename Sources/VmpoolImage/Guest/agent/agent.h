// vmpool guest agent: serves the host on the VM's virtio-serial ports.
//
// Ports. The agent finds its ports by name in /sys/class/virtio-ports: org.vmpool.ctl
// for control requests and org.vmpool.exec.N for commands (the host takes a free one per
// `vmpool exec`). Every port is an independent session; any frame is accepted on any port.
// With no host connected, virtio_console reports POLLHUP continuously, so such a port is left
// out of the poll set and watched through SIGIO (O_ASYNC), which the driver raises on every
// host connect and disconnect and on arriving data. The ports are found again on uevents
// (and every 500 ms until the control port exists: virtio_console may load after the agent).
//
// Session boundaries. The driver exposes only whether a host is connected now, and delivers
// the host's connect and disconnect notices on another virtqueue than data, handled later:
// the first frames of a new host may be here before the notice that the previous host left,
// or both notices may be handled before the agent looks (it then sees no disconnect at all).
// A port can therefore be used two ways:
//  - In-band sessions (what vmpool's exec does): the host opens every session with an H
//    frame carrying a random token. The H ends whatever the port ran before (its command is
//    killed, its undelivered output dropped) and is echoed; the host discards everything it
//    receives before the echo (the tail of an older session's output). A session ends
//    in-band when X has been sent, or at the next H. Notices then only serve to find a host
//    that vanished in the middle of a session: when the port shows no host connected and no
//    byte arrives for --host-gone-ms (default 3000; hosts send P frames every second while
//    they wait), the session's command is killed and its output dropped; if the host was cut
//    in the middle of a frame, input is skipped up to the next H frame. A stale disconnect
//    notice of an older connection never ends a session that is still sending.
//  - Without an H frame (the control port, older hosts), a host connection starts a
//    session and a host disconnect ends it: the command running on the port is killed (its
//    whole process group, SIGKILL), buffers are dropped and the frame parser restarts, and
//    whole frames that arrived before the disconnect showed are kept for the next session
//    (see settle). A host that reuses such a port at once may find its frames taken by the
//    older session.
//
// Testing mode: `vmpool-agent --fd NAME=N ... [--notices FD] [--host-gone-ms MS]` serves
// already open descriptors (socket pairs) instead; EOF on one ends its session for good, and
// the agent exits once every descriptor has ended. Lines `NAME down` and `NAME up` on the
// --notices descriptor stand for the driver's disconnect and connect notices of port NAME.
//
// Frames, both directions: 1 byte type, 4 bytes big-endian payload length, payload.
// The agent refuses payloads above 1 MiB from the host (answer `A` "0 error frame too
// large", then input is ignored until the session ends, or in an in-band session up to the
// next H frame) and sends at most 64 KiB per frame.
//
// Host to guest:
//   H  session start: a token of 8 to 64 characters [0-9A-Za-z_-]; answered by H with the same
//      token after the port's earlier session was ended (see Session boundaries)
//   P  the host is still there: no answer (sent every second while a host waits)
//   Q  control request, text `ID COMMAND [ARGS...]`, answered by A `ID ok [DATA]` or
//      `ID error MESSAGE`:
//        ping                      -> ok pong
//        info                      -> ok cpus=N memMiB=M time=SEC.USEC (online CPUs and memory)
//        online                    -> online every offline memory block and CPU, then as info
//        time SEC[.FRAC]           -> set CLOCK_REALTIME
//        seed HEX                  -> add the bytes to the kernel RNG, credited as entropy
//        hello [time=SEC.FRAC] [seed=HEX] [name=HOSTNAME] [machine=32HEX]
//              [net=IFACE,MAC,ADDR/PREFIX,GATEWAY|-]
//                                  -> all validated first, then applied in that order; ok pong
//                                     (the older positional form `hello SEC.FRAC HEX` still works)
//   C  run a command: entries of one tag byte and a NUL-terminated string: `a` argv element
//      (at least one), `e` KEY=VALUE environment, `d` working directory, `t` ROWSxCOLS for a
//      pty, `i` 1 to forward stdin (otherwise stdin is /dev/null). The environment starts
//      from PATH and HOME, with the image's Env over them (IMAGE_CONFIG), and the directory
//      is the image's WorkingDir, else /. Answered by S (the pid)
//      once the command runs, or X `error 127|126|125 MESSAGE` when it cannot. Under TCG
//      the command starts with ADDR_NO_RANDOMIZE unless its environment has VMPOOL_ASLR=1.
//   I  stdin bytes for the running command; an empty I closes its stdin (sends EOF on a pty)
//   K  signal number: kill(-pgid, sig)
//   W  ROWSxCOLS: resize the pty
// Guest to host:
//   H echo of the host's H, A answer, S started (pid), O stdout, E stderr, X exit (`exit N`,
//   `signal N` or `error CODE MESSAGE`). All O and E bytes precede X; X comes once the
//   command has exited and both of its output pipes reached EOF.
//
// One process, one poll() loop, every descriptor non-blocking. Memory is bounded: per port a
// 64 KiB input buffer, a 256 KiB output ring and at most one pending frame of up to 1 MiB;
// command output is read only while its port's ring has room, and a port is read only while
// its command's stdin pipe accepts data. No fork for control requests.
//
// Files, one job each, sharing this header:
//   main.c      arguments, signals and the poll() loop
//   protocol.c  frames: the output ring, answers, the frame parser, reading and writing ports
//   session.c   session boundaries: H frames, host connects and disconnects, settle
//   ports.c     finding and opening the virtio-serial ports; testing mode's notices
//   exec.c      commands: the C request, fork and exec, pty, stdin, output, exit status
//   control.c   control requests (Q frames) and hello
//   identity.c  guest facts and identity: CPUs, memory, clock, RNG seed, hostname, machine id
//   network.c   interface configuration over rtnetlink
//   util.c      small helpers
//
// Build: gcc -static -Os -s -o vmpool-agent *.c
#ifndef VMPOOL_AGENT_H
#define VMPOOL_AGENT_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <net/if.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define FRAME_HEADER 5
#define MAX_IN_PAYLOAD (1u << 20)      // largest frame accepted from the host
#define MAX_OUT_PAYLOAD (64u << 10)    // largest frame sent to the host
#define IN_SIZE (64u << 10)            // per port input buffer
#define OUT_SIZE (256u << 10)          // per port output ring (power of two)
#define OUT_RESERVE (16u << 10)        // ring space kept for answers, S and X frames
#define ANSWER_MAX 4000                // longest A payload
#define MIN_READ 4096                  // read command output only with this much room
#define MAX_PORTS 64
#define PIPE_SIZE (1 << 20)            // requested size of a command's output pipes

enum { PORT_IDLE, PORT_ACTIVE, PORT_DEAD };
enum { BLOCK_NONE, BLOCK_STDIN, BLOCK_OUTPUT };
enum { PHASE_HEADER, PHASE_CHECK, PHASE_PAYLOAD };

struct job {
    pid_t pid;
    int status_fd;   // exec status pipe, until EOF
    int out_fd;      // stdout pipe, or the pty master
    int err_fd;      // stderr pipe; -1 with a pty
    int in_fd;       // stdin pipe, or a duplicate of the pty master; -1 when closed
    int pty;
    int exec_ok;     // the status pipe reached EOF without an error: the command runs
    int started;     // S sent
    int exited;
    int status;      // wait status once exited
    int fail_code;   // 126/127 when the command could not run
    char fail_msg[300];
    char argv0[128]; // for messages
    char cwd[128];
};

struct port {
    char name[64];   // "ctl", "exec.0", or the name given with --fd
    char dev[256];   // sysfs entry (vport1p1); empty in testing mode
    int fd;
    int state;
    int seen;        // set by the last scan
    // input
    unsigned char *in;
    size_t in_start, in_end;
    int phase;
    unsigned char hdr[FRAME_HEADER];
    size_t hdr_len;            // header bytes read so far
    unsigned char type;
    uint32_t len, got;         // current frame's payload length and bytes consumed
    unsigned char *payload;    // payload of a non-I frame being collected
    int discard;               // an oversized frame was refused: ignore input
    size_t carry;              // input kept at the start of `in` for the next session
    int blocked;
    // in-band sessions (H frames)
    int inband;                // an H frame came: sessions begin and end in-band from now on
    int resync;                // skipping input up to the next H frame (a stream cut short)
    int hup;                   // in-band: the port shows no host connected (scan mode: not polled)
    long long quiet_since;     // in-band, hup: ms (CLOCK_MONOTONIC) since which nothing came
    // output ring
    unsigned char *out;
    size_t out_head, out_tail; // free-running counters
    struct job *job;
};

// Network configuration from hello: IFACE,MAC,ADDR/PREFIX,GATEWAY|-
struct netconf {
    char iface[IF_NAMESIZE];
    unsigned char mac[6];
    struct in_addr addr, gateway;
    int prefix;
    int has_address;  // ADDR/PREFIX given; `-` brings the link up with no address (a template)
    int has_gateway;
};

// util.c
void put32(unsigned char *p, uint32_t v);
uint32_t get32(const unsigned char *p);
void close_fd(int *fd);
long long now_ms(void);
void set_nonblock(int fd);
int read_small(const char *path, char *buf, size_t size);
int write_small(const char *path, const char *text);
int hexval(int c);
int parse_size(const char *text, unsigned short *rows, unsigned short *cols);

// protocol.c
size_t out_used(const struct port *p);
size_t out_free(const struct port *p);
void out_put(struct port *p, const void *data, size_t len);
void out_frame(struct port *p, unsigned char type, const void *data, size_t len);
int ring_iov(const struct port *p, size_t from, size_t len, struct iovec iov[2]);
void answer(struct port *p, const char *id, const char *status, const char *data);
void exit_error(struct port *p, int code, const char *message);
void port_read(struct port *p);
void port_flush(struct port *p);
void pump(struct port *p);

// session.c
void parser_restart(struct port *p);
void session_begin(struct port *p, const unsigned char *token, size_t len);
int resync(struct port *p);
void host_down(struct port *p);
long long host_check(struct port *p, long long now);
int session_start(struct port *p);
void session_end(struct port *p);

// ports.c
struct port *port_new(const char *name, int fd);
void check_idle(void);
void read_notices(void);
void scan_ports(void);
int uevent_changed(void);

// exec.c
void load_defaults(void);
void job_free(struct port *p);
void job_signal(struct job *j, int sig);
int under_tcg(void);
void start_command(struct port *p, unsigned char *payload, size_t len);
void job_status(struct job *j);
void job_read(struct port *p, int *fd, unsigned char type);
void job_progress(struct port *p);
void job_stdin_close(struct job *j);
void reap(void);

// control.c
void control(struct port *p, char *text);

// identity.c
void info(struct port *p, const char *id);
void online_all(const char *dir, const char *prefix, const char *file, const char *offline, const char *value);
int parse_time(const char *text, struct timespec *ts);
int valid_hex(const char *hex);
int seed(const char *hex);
int valid_hostname(const char *name);
int valid_machine_id(const char *id);
int set_hostname(const char *name, char *err, size_t errlen);
int set_machine_id(const char *id, char *err, size_t errlen);
void identity_on_tmpfs(void);

// network.c
int parse_net(const char *text, struct netconf *nc);
void announce(int index, const unsigned char *mac, struct in_addr addr);
int configure_net(const struct netconf *nc, int *announce_at, char *err, size_t errlen);

// main.c
extern struct port *ports[MAX_PORTS];
extern int nports;
extern int testing;
extern int fixed_layout;
extern int uevent_fd;
extern int have_ctl;
extern int idle_changed;
extern int notice_fd;
extern long long host_gone_ms;

#endif
