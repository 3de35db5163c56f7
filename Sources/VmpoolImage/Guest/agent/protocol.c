// vmpool guest agent, frames: the output ring, answers, the frame parser, reading and writing ports (see agent.h).
#include "agent.h"

#include <sys/ioctl.h>

// ---------------------------------------------------------------------------------------------
// Output ring

size_t out_used(const struct port *p) { return p->out_tail - p->out_head; }
size_t out_free(const struct port *p) { return OUT_SIZE - out_used(p); }

void out_put(struct port *p, const void *data, size_t len) {
    const unsigned char *src = data;
    while (len > 0) {
        size_t at = p->out_tail & (OUT_SIZE - 1);
        size_t n = OUT_SIZE - at < len ? OUT_SIZE - at : len;
        memcpy(p->out + at, src, n);
        p->out_tail += n;
        src += n;
        len -= n;
    }
}

// Queues one frame; the caller made sure the ring has room.
void out_frame(struct port *p, unsigned char type, const void *data, size_t len) {
    unsigned char h[FRAME_HEADER];
    h[0] = type;
    put32(h + 1, (uint32_t)len);
    out_put(p, h, sizeof h);
    out_put(p, data, len);
}

// Describes `len` bytes of the ring from counter `from` as at most two segments.
int ring_iov(const struct port *p, size_t from, size_t len, struct iovec iov[2]) {
    size_t at = from & (OUT_SIZE - 1);
    size_t first = OUT_SIZE - at < len ? OUT_SIZE - at : len;
    iov[0].iov_base = p->out + at;
    iov[0].iov_len = first;
    if (first == len) return 1;
    iov[1].iov_base = p->out;
    iov[1].iov_len = len - first;
    return 2;
}

// ---------------------------------------------------------------------------------------------
// Answers

void answer(struct port *p, const char *id, const char *status, const char *data) {
    char text[ANSWER_MAX + 1];
    int n = snprintf(text, sizeof text, "%s %s%s%s", id, status, data && *data ? " " : "", data ? data : "");
    if (n < 0) return;
    if (n > ANSWER_MAX) n = ANSWER_MAX;
    out_frame(p, 'A', text, (size_t)n);
}

void exit_error(struct port *p, int code, const char *message) {
    char text[320];
    int n = snprintf(text, sizeof text, "error %d %s", code, message);
    if (n < 0) return;
    if (n >= (int)sizeof text) n = sizeof text - 1;
    out_frame(p, 'X', text, (size_t)n);
}

// ---------------------------------------------------------------------------------------------
// The frame parser, and reading and writing the port

// Handles one complete non-I frame.
static void dispatch(struct port *p) {
    unsigned char *payload = p->payload;
    size_t len = p->len;
    p->payload = NULL;
    switch (p->type) {
    case 'H':
        session_begin(p, payload, payload ? len : 0);
        break;
    case 'Q': {
        char *text = payload ? (char *)payload : "";
        if (payload) payload[len] = 0;
        control(p, text);
        break;
    }
    case 'C':
        if (!payload) exit_error(p, 125, p->job ? "busy" : "bad request: no argv");
        else start_command(p, payload, len);
        break;
    case 'K':
        if (p->job && payload) {
            payload[len] = 0;
            char *end;
            long sig = strtol((char *)payload, &end, 10);
            if (end != (char *)payload && *end == 0 && sig >= 1 && sig <= 64) job_signal(p->job, (int)sig);
        }
        break;
    case 'W':
        if (p->job && p->job->pty && payload) {
            payload[len] = 0;
            struct winsize ws = {0};
            int fd = p->job->in_fd >= 0 ? p->job->in_fd : p->job->out_fd;
            if (fd >= 0 && parse_size((char *)payload, &ws.ws_row, &ws.ws_col) == 0) ioctl(fd, TIOCSWINSZ, &ws);
        }
        break;
    default:
        break;  // unknown frame types are skipped
    }
    free(payload);
}

// What a step of the parser tells its loop: go on, or wait for input, room or the command.
enum { PARSE_MORE, PARSE_STOP };

// A frame was refused (too large, or no memory for it): in-band, input is skipped up to the
// next H frame; otherwise it is ignored until the session ends.
static void parse_refuse(struct port *p) {
    if (p->inband) {
        parser_restart(p);
        p->resync = 1;
    } else {
        p->discard = 1;
    }
}

// PHASE_HEADER: collects the frame's header.
static int parse_header(struct port *p) {
    if (p->resync && p->hdr_len == 0 && !resync(p)) return PARSE_STOP;
    size_t avail = p->in_end - p->in_start;
    unsigned char *data = p->in + p->in_start;
    if (avail == 0) return PARSE_STOP;
    size_t n = FRAME_HEADER - p->hdr_len < avail ? FRAME_HEADER - p->hdr_len : avail;
    memcpy(p->hdr + p->hdr_len, data, n);
    p->hdr_len += n;
    p->in_start += n;
    if (p->hdr_len < FRAME_HEADER) return PARSE_STOP;
    p->type = p->hdr[0];
    p->len = get32(p->hdr + 1);
    p->got = 0;
    p->hdr_len = 0;
    p->phase = PHASE_CHECK;
    return PARSE_MORE;
}

// PHASE_CHECK: refuses a frame that is too large, and makes room for a payload to collect.
static int parse_check(struct port *p) {
    if (p->len > MAX_IN_PAYLOAD) {
        if (out_free(p) < OUT_RESERVE) {
            p->blocked = BLOCK_OUTPUT;
            return PARSE_STOP;
        }
        answer(p, "0", "error", "frame too large");
        parse_refuse(p);
        return PARSE_MORE;
    }
    if (p->type != 'I' && p->len > 0) {
        p->payload = malloc(p->len + 1);
        if (!p->payload) {
            parse_refuse(p);
            return PARSE_MORE;
        }
    }
    p->phase = PHASE_PAYLOAD;
    return PARSE_MORE;
}

// An I frame's payload: stdin bytes go straight from the input buffer to the command's stdin.
static int parse_stdin(struct port *p) {
    size_t avail = p->in_end - p->in_start;
    unsigned char *data = p->in + p->in_start;
    struct job *j = p->job;
    size_t n = p->len - p->got < avail ? p->len - p->got : avail;
    if (n > 0 && j && j->in_fd >= 0) {
        ssize_t w = write(j->in_fd, data, n);
        if (w < 0) {
            if (errno == EAGAIN) {
                p->blocked = BLOCK_STDIN;
                return PARSE_STOP;
            }
            if (errno == EINTR) return PARSE_MORE;
            close_fd(&j->in_fd);  // the command closed its stdin: drop the rest
        } else {
            n = (size_t)w;
        }
    }
    p->in_start += n;
    p->got += (uint32_t)n;
    if (p->got < p->len) return n == 0 ? PARSE_STOP : PARSE_MORE;
    if (p->len == 0 && j) job_stdin_close(j);
    p->phase = PHASE_HEADER;
    return PARSE_MORE;
}

// Any other frame's payload: collected whole, then the frame is handled.
static int parse_payload(struct port *p) {
    size_t avail = p->in_end - p->in_start;
    unsigned char *data = p->in + p->in_start;
    if (p->got < p->len) {
        if (avail == 0) return PARSE_STOP;
        size_t n = p->len - p->got < avail ? p->len - p->got : avail;
        memcpy(p->payload + p->got, data, n);
        p->got += (uint32_t)n;
        p->in_start += n;
        if (p->got < p->len) return PARSE_STOP;
    }
    if (p->type != 'H' && out_free(p) < OUT_RESERVE) {  // an H empties the ring
        p->blocked = BLOCK_OUTPUT;
        return PARSE_STOP;
    }
    p->phase = PHASE_HEADER;
    dispatch(p);
    return PARSE_MORE;
}

// Consumes buffered input until it runs out or something downstream is full.
static void parse(struct port *p) {
    while (p->state == PORT_ACTIVE && p->blocked == BLOCK_NONE) {
        if (p->discard) {
            p->in_start = p->in_end = 0;
            return;
        }
        int step;
        if (p->phase == PHASE_HEADER) step = parse_header(p);
        else if (p->phase == PHASE_CHECK) step = parse_check(p);
        else if (p->type == 'I') step = parse_stdin(p);
        else step = parse_payload(p);
        if (step == PARSE_STOP) break;
    }
    if (p->in_start == p->in_end) p->in_start = p->in_end = 0;
}

// Reads what the port has into the input buffer; ends the session on EOF.
void port_read(struct port *p) {
    for (int round = 0; round < 64; round++) {
        if (p->in_end == IN_SIZE && p->in_start > 0) {
            memmove(p->in, p->in + p->in_start, p->in_end - p->in_start);
            p->in_end -= p->in_start;
            p->in_start = 0;
        }
        if (p->in_end == IN_SIZE) return;
        ssize_t n = read(p->fd, p->in + p->in_end, IN_SIZE - p->in_end);
        if (n > 0) {
            p->in_end += (size_t)n;
            if (p->discard) p->in_start = p->in_end = 0;
            if (p->hup) p->quiet_since = now_ms();
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        // EOF: the host went away (virtio: no data and no host connected now).
        if (p->inband && !testing) host_down(p);
        else session_end(p);
        return;
    }
}

void port_flush(struct port *p) {
    while (p->state == PORT_ACTIVE && out_used(p) > 0) {
        struct iovec iov[2];
        size_t len = out_used(p);
        int cnt = ring_iov(p, p->out_head, len, iov);
        ssize_t n = writev(p->fd, iov, cnt);
        if (n > 0) {
            p->out_head += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        if (p->inband && !testing) host_down(p);
        else session_end(p);
        return;
    }
    if (p->state == PORT_ACTIVE && out_used(p) == 0) p->out_head = p->out_tail = 0;
}

// Everything a port can do without waiting.
void pump(struct port *p) {
    for (int round = 0; round < 4 && p->state == PORT_ACTIVE; round++) {
        size_t before_in = p->in_end - p->in_start, before_out = out_used(p);
        if (p->blocked == BLOCK_OUTPUT && out_free(p) >= OUT_RESERVE) p->blocked = BLOCK_NONE;
        parse(p);
        if (p->job) job_progress(p);
        port_flush(p);
        if (p->state != PORT_ACTIVE) return;
        if (p->in_end - p->in_start == before_in && out_used(p) == before_out) return;
    }
}
