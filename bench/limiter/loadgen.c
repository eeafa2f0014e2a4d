/*
 * A small HTTP/1.1 load generator for the limiter benchmark: CONNS
 * keep-alive connections each send the same request again as soon as the
 * previous answer is complete, for SECONDS; one thread, epoll.
 *
 *   loadgen HOST PORT CONNS SECONDS REQUEST_FILE
 *
 * Prints one line:
 *   requests N seconds S rps R mean_us M p50_us A p99_us B status C:n ...
 *
 * Answers must carry Content-Length (the module's JSON answers do).
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS   256
#define BUF_SIZE    65536
#define MAX_SAMPLES (4u << 20)

typedef struct {
    int         fd;
    size_t      sent;
    size_t      got;
    char        buf[BUF_SIZE];
    double      start;
} conn_t;

static const char  *req;
static size_t       req_len;
static double      *lat;            /* [n_lat] microseconds */
static size_t       n_lat;
static unsigned     statuses[600];


static double
now_us(void)
{
    struct timespec  ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}


static int
cmp_double(const void *a, const void *b)
{
    double  x = *(const double *) a, y = *(const double *) b;

    return (x > y) - (x < y);
}


static int
open_conn(const char *host, int port)
{
    int                 fd, one;
    struct sockaddr_in  sin;

    fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        return -1;
    }

    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_port = htons(port);

    if (inet_pton(AF_INET, host, &sin.sin_addr) != 1
        || connect(fd, (struct sockaddr *) &sin, sizeof(sin)) != 0)
    {
        close(fd);
        return -1;
    }

    one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);

    return fd;
}


/* A complete answer in c->buf: its length, or 0 (need more), -1 (bad). */

static long
complete(conn_t *c)
{
    char    *end, *cl;
    long     len;
    size_t   head;

    c->buf[c->got] = '\0';

    end = strstr(c->buf, "\r\n\r\n");
    if (end == NULL) {
        return 0;
    }

    head = end + 4 - c->buf;

    cl = strcasestr(c->buf, "\r\nContent-Length:");
    if (cl == NULL || cl > end) {
        return -1;
    }

    len = strtol(cl + 17, NULL, 10);

    if (c->got < head + (size_t) len) {
        return 0;
    }

    return (long) (head + len);
}


static int
send_req(conn_t *c)
{
    ssize_t  n;

    while (c->sent < req_len) {
        n = write(c->fd, req + c->sent, req_len - c->sent);

        if (n < 0) {
            return errno == EAGAIN ? 0 : -1;
        }

        c->sent += n;
    }

    return 0;
}


int
main(int argc, char **argv)
{
    int                  ep, i, n, port, nconns, status;
    long                 done;
    FILE                *f;
    char                *r;
    double               t0, seconds, sum, end;
    size_t               size, k;
    ssize_t              got;
    conn_t              *conns, *c;
    struct epoll_event   ev, evs[MAX_CONNS];

    if (argc != 6) {
        fprintf(stderr, "usage: loadgen HOST PORT CONNS SECONDS FILE\n");
        return 1;
    }

    port = atoi(argv[2]);
    nconns = atoi(argv[3]);
    seconds = atof(argv[4]);

    if (nconns < 1 || nconns > MAX_CONNS || seconds <= 0) {
        fprintf(stderr, "loadgen: bad CONNS or SECONDS\n");
        return 1;
    }

    f = fopen(argv[5], "rb");
    if (f == NULL) {
        perror(argv[5]);
        return 1;
    }

    r = malloc(BUF_SIZE);
    size = r ? fread(r, 1, BUF_SIZE, f) : 0;
    fclose(f);

    if (size == 0) {
        fprintf(stderr, "loadgen: empty request\n");
        return 1;
    }

    req = r;
    req_len = size;

    lat = malloc(MAX_SAMPLES * sizeof(double));
    conns = calloc(nconns, sizeof(conn_t));
    ep = epoll_create1(0);

    if (lat == NULL || conns == NULL || ep < 0) {
        fprintf(stderr, "loadgen: out of memory\n");
        return 1;
    }

    t0 = now_us();
    end = t0 + seconds * 1e6;

    for (i = 0; i < nconns; i++) {
        c = &conns[i];
        c->fd = open_conn(argv[1], port);

        if (c->fd < 0) {
            perror("connect");
            return 1;
        }

        ev.events = EPOLLIN;
        ev.data.ptr = c;
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);

        c->start = now_us();

        if (send_req(c) != 0) {
            perror("write");
            return 1;
        }
    }

    while (now_us() < end) {
        n = epoll_wait(ep, evs, MAX_CONNS, 100);

        for (i = 0; i < n; i++) {
            c = evs[i].data.ptr;

            got = read(c->fd, c->buf + c->got, BUF_SIZE - 1 - c->got);

            if (got <= 0) {
                if (got < 0 && errno == EAGAIN) {
                    continue;
                }

                fprintf(stderr, "loadgen: connection closed\n");
                return 1;
            }

            c->got += got;

            done = complete(c);

            if (done < 0) {
                fprintf(stderr, "loadgen: no Content-Length:\n%s\n",
                        c->buf);
                return 1;
            }

            if (done == 0) {
                continue;
            }

            status = atoi(c->buf + 9);
            if (status > 0 && status < 600) {
                statuses[status]++;
            }

            if (n_lat < MAX_SAMPLES) {
                lat[n_lat++] = now_us() - c->start;
            }

            /* pipelining is not used: the rest would be a next answer */

            c->got = 0;
            c->sent = 0;
            c->start = now_us();

            if (send_req(c) != 0) {
                perror("write");
                return 1;
            }
        }
    }

    seconds = (now_us() - t0) / 1e6;

    if (n_lat == 0) {
        fprintf(stderr, "loadgen: no answers\n");
        return 1;
    }

    sum = 0;

    for (k = 0; k < n_lat; k++) {
        sum += lat[k];
    }

    qsort(lat, n_lat, sizeof(double), cmp_double);

    printf("requests %zu seconds %.2f rps %.0f mean_us %.1f p50_us %.1f "
           "p99_us %.1f", n_lat, seconds, n_lat / seconds, sum / n_lat,
           lat[n_lat / 2], lat[(size_t) (n_lat * 0.99)]);

    for (k = 0; k < 600; k++) {
        if (statuses[k]) {
            printf(" status %zu:%u", k, statuses[k]);
        }
    }

    printf("\n");

    return 0;
}
