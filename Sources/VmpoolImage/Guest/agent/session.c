// vmpool guest agent, session boundaries: H frames, host connects and disconnects, settle (see agent.h).
#include "agent.h"

#include <signal.h>

#define TOKEN_MIN 8                    // an H frame's token: 8 to 64 characters [0-9A-Za-z_-]
#define TOKEN_MAX 64

// ---------------------------------------------------------------------------------------------
// Sessions

static void parser_reset(struct port *p) {
    p->in_start = p->in_end = 0;
    p->phase = PHASE_HEADER;
    p->hdr_len = 0;
    p->len = p->got = 0;
    p->discard = 0;
    p->blocked = BLOCK_NONE;
    free(p->payload);
    p->payload = NULL;
}

static int parser_aligned(const struct port *p) { return p->phase == PHASE_HEADER && p->hdr_len == 0; }

// Drops a frame half received: the parser waits for a header again.
void parser_restart(struct port *p) {
    p->phase = PHASE_HEADER;
    p->hdr_len = 0;
    p->len = p->got = 0;
    free(p->payload);
    p->payload = NULL;
}

static int token_char(unsigned char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == '-';
}

// Whether the first `n` bytes of a token are valid characters.
static int token_prefix_ok(const unsigned char *t, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!token_char(t[i])) return 0;
    return 1;
}

// An H frame: the port's earlier session ends (its command is killed, its output not yet sent
// is dropped) and the token goes back; the host takes what follows the echo as this session's.
void session_begin(struct port *p, const unsigned char *token, size_t len) {
    if (len < TOKEN_MIN || len > TOKEN_MAX || !token_prefix_ok(token, len)) return;
    if (p->job) {
        job_signal(p->job, SIGKILL);
        job_free(p);
    }
    p->out_head = p->out_tail = 0;
    p->blocked = BLOCK_NONE;
    p->inband = 1;
    out_frame(p, 'H', token, len);
}

// Skipping input up to the next H frame: drops the bytes that cannot begin one. Returns true
// when the input now begins with a whole, valid H frame; false when more input is needed (a
// candidate cut by the end of the input is kept).
int resync(struct port *p) {
    const unsigned char *data = p->in + p->in_start;
    size_t avail = p->in_end - p->in_start, at = 0;
    for (; at < avail; at++) {
        if (data[at] != 'H') continue;
        size_t have = avail - at;
        if (have < FRAME_HEADER) break;
        uint32_t len = get32(data + at + 1);
        if (len < TOKEN_MIN || len > TOKEN_MAX) continue;
        size_t n = have - FRAME_HEADER < len ? have - FRAME_HEADER : len;
        if (!token_prefix_ok(data + at + FRAME_HEADER, n)) continue;
        if (n < len) break;
        p->in_start += at;
        p->resync = 0;
        return 1;
    }
    p->in_start += at;
    return 0;
}

// In-band: the port shows no host connected. That may be a stale notice of an older
// connection while the current host still sends, so nothing ends here; see host_check.
void host_down(struct port *p) {
    if (p->hup) return;
    p->hup = 1;
    p->quiet_since = now_ms();
    idle_changed = 1;
}

// In-band, no host shown connected: once nothing has come for host_gone_ms, the host is gone.
// A running command is killed and the output for that host dropped; a frame it left half
// sent is dropped with whatever follows, up to the next H. Returns the ms until this is due,
// or -1 when there is nothing to end.
long long host_check(struct port *p, long long now) {
    if (p->state != PORT_ACTIVE || !p->hup || (!p->job && parser_aligned(p))) return -1;
    long long due = p->quiet_since + host_gone_ms;
    if (now < due) return due - now;
    if (p->job) {
        job_signal(p->job, SIGKILL);
        job_free(p);
    }
    p->out_head = p->out_tail = 0;
    p->blocked = BLOCK_NONE;
    if (!parser_aligned(p)) {
        parser_restart(p);
        p->resync = 1;
    }
    return -1;
}

int session_start(struct port *p) {
    if (!p->in) p->in = malloc(IN_SIZE);
    if (!p->out) p->out = malloc(OUT_SIZE);
    if (!p->in || !p->out) return -1;
    parser_reset(p);
    p->in_end = p->carry;  // input that arrived before the host's connect notice
    p->carry = 0;
    p->out_head = p->out_tail = 0;
    p->state = PORT_ACTIVE;
    return 0;
}

// Settles what a virtio port holds when its session ends. Data and the host's connect and
// disconnect notices travel on different virtqueues, and the driver handles data at once but
// notices later: by the time a disconnect shows, all of the ended session's input is here,
// possibly followed by the first frames of a host that has connected since. The bytes that
// complete the frame the session was in are dropped. If the rest ends on a frame boundary it
// is kept for the next session (whole frames: the next host's, or ones the old host sent
// without waiting for their answers); if it ends inside a frame, it is what is left of a
// stream cut short, and is dropped. Returns how many bytes, now at the start of p->in, the
// next session starts with.
static size_t settle(struct port *p) {
    unsigned char hdr[FRAME_HEADER];
    size_t hdr_len = 0, need = 0;  // a header being read, or payload bytes still to come
    int garbage = p->discard;
    if (p->phase == PHASE_HEADER) {
        memcpy(hdr, p->hdr, p->hdr_len);
        hdr_len = p->hdr_len;
    } else if (p->phase == PHASE_CHECK) {
        need = p->len;
        garbage |= p->len > MAX_IN_PAYLOAD;
    } else {
        need = p->len - p->got;
    }
    if (!p->in) return 0;
    // Unparsed input first, then everything the port holds (the virtqueue holds at most a
    // few hundred KiB of a host that is gone; past 1 MiB a new host is streaming already).
    size_t n = p->in_end - p->in_start;
    memmove(p->in, p->in + p->in_start, n);
    int overflow = 0;
    for (int round = 0; round < 16;) {
        if (n == IN_SIZE) {
            overflow = 1;  // more than a session start: a stream cut short
            n = 0;
            round++;
        }
        ssize_t r = read(p->fd, p->in + n, IN_SIZE - n);
        if (r > 0) {
            n += (size_t)r;
            continue;
        }
        if (r < 0 && errno == EINTR) continue;
        break;  // 0: empty, the host gone; EAGAIN: empty, a host connected again
    }
    if (garbage || overflow) return 0;
    size_t at = 0, boundary = SIZE_MAX;
    if (hdr_len == 0 && need == 0) boundary = 0;
    while (at < n) {
        if (need > 0) {
            size_t k = n - at < need ? n - at : need;
            at += k;
            need -= k;
        } else {
            hdr[hdr_len++] = p->in[at++];
            if (hdr_len < FRAME_HEADER) continue;
            hdr_len = 0;
            need = get32(hdr + 1);
            if (need > MAX_IN_PAYLOAD) return 0;
        }
        if (need == 0 && hdr_len == 0 && boundary == SIZE_MAX) boundary = at;
    }
    if (need > 0 || hdr_len > 0 || boundary == SIZE_MAX) return 0;
    memmove(p->in, p->in + boundary, n - boundary);
    return n - boundary;
}

void session_end(struct port *p) {
    if (p->job) {
        job_signal(p->job, SIGKILL);
        job_free(p);
    }
    size_t carry = testing ? 0 : settle(p);
    parser_reset(p);
    p->carry = carry;
    free(p->out);
    p->out = NULL;
    p->out_head = p->out_tail = 0;
    if (carry == 0) {
        free(p->in);
        p->in = NULL;
    }
    if (testing) {
        close_fd(&p->fd);
        p->state = PORT_DEAD;
        return;
    }
    p->state = PORT_IDLE;
    idle_changed = 1;
}
