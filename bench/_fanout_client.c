/* One load process of bench/fanout.py (--c-clients): N minimal WebSocket subscribers on one epoll loop.

   The same protocol, arguments and JSON output as bench/_fanout_client.py --raw, in C: a Python client reads
   30-35k frames/s on one core, so at 5,000 x 20 msg/s (100k deliveries/s) on a 2-core machine it, not the
   server, was the limit. This one reads several times that for a fraction of a core.
   Real handshake and framing: a masked subscribe frame (accessd), pongs for pings (nchan closes otherwise),
   unmasked server frames with 2, 4 or 10 byte headers. Per connection, in the measured window: the distinct
   sequence numbers ("n") received, their span (lost: what the span holds that never came) and repeats
   (duplicates), so that a message published later but sequenced earlier (concurrent POSTs) is not counted
   lost, as the Python client, which keeps only the newest number, would (nor is one of the span that
   arrives in the settling second after the window); the lag from the frame's
   timestamp ("ts" or "t", ms since the epoch) to arrival.
   Build: gcc -O2 -o fanout_client bench/_fanout_client.c
   Usage: fanout_client URL CHANNEL --conns N --seconds S --warmup W --ready-file PATH
          [--proto accessd|nchan] [--lag-key ts|t] [--raw] */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BUF_CAP (256 * 1024) /* per connection; a frame larger than this is an error */
#define HIST_PER_MS 10                       /* lag histogram: 0.1 ms buckets (a P95 of ~10 ms compares */
#define HIST_BUCKETS (600000LL * HIST_PER_MS) /* to 1 %, not 10 %), up to 10 minutes; untouched pages cost nothing */

#define SEEN_BITS (1 << 16) /* sequence numbers seen in the window, modulo this */

typedef struct {
    int fd;
    int streaming;           /* handshake done */
    long long low, high;     /* lowest and highest sequence number in the window; low -1 before the first */
    long long unique;        /* distinct sequence numbers in the window */
    long long late;          /* of the window's span, arrived in the settling second after it */
    size_t len;
    unsigned char *buf;
    unsigned char seen[SEEN_BITS / 8];
} conn_t;

static long long duplicates, connected, errors;
static int measuring;
static int settling; /* after the window: late frames within its span are not lost (published out of order) */
static unsigned long long *hist;
static char last_error[200];
static const char *lag_key = "\"ts\":";
static int nchan;

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

static double mono_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void fail(conn_t *c, const char *why) {
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
        errors++;
        snprintf(last_error, sizeof last_error, "%s", why);
    }
}

/* `"key": ?<number>` in a frame; 1 when found. */
static int number_after(const unsigned char *p, size_t n, const char *key, double *out) {
    size_t k = strlen(key);
    const unsigned char *hit = memmem(p, n, key, k);
    if (!hit) return 0;
    const unsigned char *q = hit + k, *end = p + n;
    if (q < end && *q == ' ') q++;
    if (q >= end || *q < '0' || *q > '9') return 0;
    char tmp[64];
    size_t i = 0;
    while (q < end && i < sizeof tmp - 1 && ((*q >= '0' && *q <= '9') || *q == '.')) tmp[i++] = *q++;
    tmp[i] = 0;
    *out = strtod(tmp, NULL);
    return 1;
}

static void record(conn_t *c, const unsigned char *frame, size_t n) {
    double seq_d;
    if (!(measuring || settling) || !number_after(frame, n, "\"n\":", &seq_d)) return; /* welcome, pings */
    long long seq = (long long)seq_d;
    unsigned bit = (unsigned)(seq % SEEN_BITS);
    if (settling) {
        if (c->low >= 0 && seq > c->low && seq < c->high && !(c->seen[bit / 8] & (1u << (bit % 8)))) {
            c->seen[bit / 8] |= (unsigned char)(1u << (bit % 8));
            c->late++;
        }
        return;
    }
    if (c->seen[bit / 8] & (1u << (bit % 8))) {
        duplicates++;
        return;
    }
    c->seen[bit / 8] |= (unsigned char)(1u << (bit % 8));
    if (c->low < 0 || seq < c->low) c->low = seq;
    if (seq > c->high) c->high = seq;
    c->unique++;
    double stamp;
    if (number_after(frame, n, lag_key, &stamp)) {
        double lag = now_ms() - stamp;
        long long bucket = lag < 0 ? 0 : (long long)(lag * HIST_PER_MS);
        if (bucket >= HIST_BUCKETS) bucket = HIST_BUCKETS - 1;
        hist[bucket]++;
    }
}

static int send_all(int fd, const unsigned char *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) continue; /* tiny frames: the buffer is never full long */
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* A client frame: masked, final, payload under 126 bytes. */
static size_t masked(unsigned char *out, int opcode, const unsigned char *payload, size_t n) {
    static const unsigned char mask[4] = {1, 2, 3, 4};
    if (n > 125) n = 125;
    out[0] = 0x80 | opcode;
    out[1] = 0x80 | (unsigned char)n;
    memcpy(out + 2, mask, 4);
    for (size_t i = 0; i < n; i++) out[6 + i] = payload[i] ^ mask[i % 4];
    return 6 + n;
}

/* Frames in the buffer; returns -1 on a protocol error. */
static int frames(conn_t *c) {
    size_t off = 0;
    while (c->len - off >= 2) {
        unsigned char *b = c->buf + off;
        size_t length = b[1] & 0x7F, head = 2;
        if (length == 126) head = 4;
        else if (length == 127) head = 10;
        if (c->len - off < head) break;
        if (length == 126) length = ((size_t)b[2] << 8) | b[3];
        else if (length == 127) {
            length = 0;
            for (int i = 2; i < 10; i++) length = (length << 8) | b[i];
        }
        if (head + length > BUF_CAP) return -1;
        if (c->len - off < head + length) break;
        int opcode = b[0] & 0x0F;
        if (opcode == 0x9) { /* a ping: answered, as a browser does */
            unsigned char pong[131];
            if (send_all(c->fd, pong, masked(pong, 0xA, b + head, length)) < 0) return -1;
        } else {
            record(c, b + head, length);
        }
        off += head + length;
    }
    memmove(c->buf, c->buf + off, c->len - off);
    c->len -= off;
    return 0;
}

/* Until the handshake's end marker: accessd's "subscribed" frame, nchan's response head. */
static int handshake(conn_t *c) {
    const char *marker = nchan ? "\r\n\r\n" : "\"subscribed\"";
    unsigned char *hit = memmem(c->buf, c->len, marker, strlen(marker));
    if (!hit) return c->len >= BUF_CAP ? -1 : 0;
    if (memcmp(c->buf, "HTTP/1.1 101", 12) != 0 && memcmp(c->buf, "HTTP/1.1 200", 12) != 0) return -1;
    unsigned char *rest = hit + strlen(marker);
    if (!nchan) { /* the rest of the "subscribed" frame */
        unsigned char *brace = memchr(rest, '}', c->buf + c->len - rest);
        if (!brace) return 0;
        rest = brace + 1;
    }
    size_t left = c->buf + c->len - rest;
    memmove(c->buf, rest, left);
    c->len = left;
    c->streaming = 1;
    connected++;
    return frames(c) < 0 ? -1 : 1;
}

static void readable(conn_t *c) {
    for (;;) {
        ssize_t r = recv(c->fd, c->buf + c->len, BUF_CAP - c->len, 0);
        if (r == 0) return fail(c, "ConnectionError('server closed the connection')");
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            if (errno == EINTR) continue;
            return fail(c, strerror(errno));
        }
        c->len += (size_t)r;
        int status = c->streaming ? frames(c) : handshake(c);
        if (status < 0) return fail(c, c->streaming ? "bad frame" : "refused or bad handshake");
        if (c->len >= BUF_CAP) return fail(c, "frame over the buffer");
    }
}

static int exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s URL CHANNEL [options]\n", argv[0]);
        return 2;
    }
    const char *url = argv[1], *channel = argv[2], *ready_file = NULL;
    int conns = 500;
    double seconds = 20, warmup = 3;
    for (int i = 3; i < argc; i++) {
        if (!strcmp(argv[i], "--conns") && i + 1 < argc) conns = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--seconds") && i + 1 < argc) seconds = atof(argv[++i]);
        else if (!strcmp(argv[i], "--warmup") && i + 1 < argc) warmup = atof(argv[++i]);
        else if (!strcmp(argv[i], "--ready-file") && i + 1 < argc) ready_file = argv[++i];
        else if (!strcmp(argv[i], "--proto") && i + 1 < argc) nchan = !strcmp(argv[++i], "nchan");
        else if (!strcmp(argv[i], "--lag-key") && i + 1 < argc) lag_key = strcmp(argv[++i], "t") ? "\"ts\":" : "\"t\":";
        else if (strcmp(argv[i], "--raw")) {
            fprintf(stderr, "unknown argument %s\n", argv[i]);
            return 2;
        }
    }
    if (!ready_file) {
        fprintf(stderr, "--ready-file is required\n");
        return 2;
    }
    /* ws://host:port/path?query or http://... */
    char host[256], target[4096];
    int port = 80;
    const char *p = strstr(url, "://");
    p = p ? p + 3 : url;
    const char *slash = strchr(p, '/');
    size_t hostlen = slash ? (size_t)(slash - p) : strlen(p);
    snprintf(host, sizeof host, "%.*s", (int)hostlen, p);
    snprintf(target, sizeof target, "%s", slash ? slash : "/");
    char *colon = strrchr(host, ':');
    if (colon) {
        port = atoi(colon + 1);
        *colon = 0;
    }
    char request[8192];
    int head = snprintf(request, sizeof request,
                        "GET %s%s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                        target, strchr(target, '?') ? "" : "?", host, port);
    if (!nchan) { /* the subscribe op goes with the handshake */
        char op[512];
        int n = snprintf(op, sizeof op, "{\"op\": \"subscribe\", \"id\": \"1\", \"channel\": \"%s\"}", channel);
        head += (int)masked((unsigned char *)request + head, 0x1, (unsigned char *)op, (size_t)n);
    }
    hist = calloc(HIST_BUCKETS, sizeof *hist);
    conn_t *cs = calloc((size_t)conns, sizeof *cs);
    int ep = epoll_create1(0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    struct hostent *he = gethostbyname(host);
    if (!he) {
        fprintf(stderr, "cannot resolve %s\n", host);
        return 2;
    }
    memcpy(&addr.sin_addr, he->h_addr_list[0], sizeof addr.sin_addr);
    for (int i = 0; i < conns; i++) {
        conn_t *c = &cs[i];
        c->low = -1;
        c->buf = malloc(BUF_CAP);
        c->fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 ||
            send_all(c->fd, (unsigned char *)request, (size_t)head) < 0) {
            fail(c, strerror(errno));
            continue;
        }
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(c->fd, F_SETFL, O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
        if (i % 50 == 49) { /* stay under the accept backlog; read what has come meanwhile */
            struct epoll_event evs[256];
            double until = mono_s() + 0.05;
            while (mono_s() < until) {
                int n = epoll_wait(ep, evs, 256, 10);
                for (int k = 0; k < n; k++) readable(evs[k].data.ptr);
            }
        }
    }
    char go_file[4200];
    snprintf(go_file, sizeof go_file, "%s.go", ready_file);
    enum { CONNECTING, READY, WARMUP, MEASURING, SETTLING } phase = CONNECTING;
    double phase_end = mono_s() + 120, started = 0;
    struct epoll_event evs[1024];
    for (;;) {
        int n = epoll_wait(ep, evs, 1024, 50);
        for (int k = 0; k < n; k++) readable(evs[k].data.ptr);
        double t = mono_s();
        if (phase == CONNECTING && (connected + errors >= conns || t > phase_end)) {
            FILE *f = fopen(ready_file, "w");
            if (!f) {
                perror(ready_file);
                return 2;
            }
            fputs("ready", f);
            fclose(f);
            phase = READY;
        } else if (phase == READY && exists(go_file)) {
            phase = WARMUP;
            phase_end = t + warmup;
        } else if (phase == WARMUP && t >= phase_end) {
            phase = MEASURING;
            measuring = 1;
            started = t;
        } else if (phase == MEASURING && t - started >= seconds) {
            phase = SETTLING;
            measuring = 0;
            settling = 1;
            phase_end = t + 1;
        } else if (phase == SETTLING && t >= phase_end) {
            break;
        }
    }
    long long received = 0, lost = 0;
    for (int i = 0; i < conns; i++) {
        if (cs[i].low >= 0) {
            received += cs[i].unique;
            lost += cs[i].high - cs[i].low + 1 - cs[i].unique - cs[i].late;
        }
    }
    printf("{\"hist\": {");
    int first = 1;
    for (long long b = 0; b < HIST_BUCKETS; b++) {
        if (hist[b]) {
            printf("%s\"%.1f\": %llu", first ? "" : ", ", (double)b / HIST_PER_MS, hist[b]);
            first = 0;
        }
    }
    printf("}, \"received\": %lld, \"lost\": %lld, \"duplicates\": %lld, \"connected\": %lld, \"errors\": %lld",
           received, lost, duplicates, connected, errors);
    if (errors) {
        printf(", \"last_error\": \"");
        for (char *q = last_error; *q; q++) putchar(*q == '"' || *q == '\\' ? '\'' : *q);
        printf("\"");
    }
    printf("}\n");
    fflush(stdout);
    return 0;
}
