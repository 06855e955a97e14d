/* gsrv's spawner in C: what gsrv/spawn/spawner.py does, message for message (the wire is
 * gsrv/spawn/wire.py, DESIGN.md's table), without an interpreter's cost per spawn.
 *
 * Run by gsrv as `gsrv-spawner CONTROL_FD GENERATION HOME...`; single-threaded, one epoll loop:
 * gsrv's requests on CONTROL_FD (SOCK_SEQPACKET, the child's stdio as SCM_RIGHTS), each child's
 * exit on a pidfd (waitid WNOWAIT: a zombie until the reap its Spawn's at_exit allows or gsrv's
 * Reap asks for), and when idle the pool's work: session cgroups made ahead, removed behind.
 * Built by the package's build (setup.py); gsrv runs it only when it is root's or gsrv's own
 * and nobody else may write it (config/spawner.py), else spawner.py.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define VERSION 2
#define MESSAGE_MAX (1 << 20)
#define FDS_MAX 3
#define BATCH_MAX 512
#define POLL_UNWATCHED_MS 50
#define READY 4
#define FORGET_S 60.0
#define SWEEP_TRIES 8
#define SWEEP_FIRST_S 0.1
#define P_PIDFD_ 3

enum { HELLO = 1, SPAWN, REAP, SPAWNED, FAILED, EXITED, REAPED, LEFT };
enum { HOLD = 0, AT_EXIT_REAP, REAP_IF_EMPTY, REAP_AND_REMOVE_IF_EMPTY };

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the wire is little-endian");

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("gsrv's spawner: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void *need(void *p) {
    if (!p) die("out of memory");
    return p;
}

static char *dup_str(const char *s) { return need(strdup(s)); }

static char *join3(const char *a, const char *b, const char *c) {
    size_t n = strlen(a) + strlen(b) + strlen(c) + 3;
    char *out = need(malloc(n));
    snprintf(out, n, "%s/%s%s%s", a, b, *c ? "/" : "", c);
    return out;
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* -- strings lists ------------------------------------------------------------------- */

typedef struct {
    char **items;
    size_t n, cap;
} Strs;

static void strs_add(Strs *s, char *item) { /* takes item */
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 4;
        s->items = need(realloc(s->items, s->cap * sizeof(char *)));
    }
    s->items[s->n++] = item;
}

static void strs_free(Strs *s) {
    for (size_t i = 0; i < s->n; i++) free(s->items[i]);
    free(s->items);
    s->items = NULL;
    s->n = s->cap = 0;
}

/* -- the wire: reading ------------------------------------------------------------- */

typedef struct {
    const uint8_t *data;
    size_t size, at;
    const char *bad; /* set: the datagram is not messages of this version */
} In;

static void get8(In *in, void *out) { /* 8 bytes as they are (an i64 or an f64), or zeros */
    if (in->bad || in->size - in->at < 8) { in->bad = "a message cut short"; return; }
    memcpy(out, in->data + in->at, 8);
    in->at += 8;
}

static int64_t get_i64(In *in) { int64_t v = 0; get8(in, &v); return v; }

static double get_f64(In *in) { double v = 0; get8(in, &v); return v; }

static int get_bool(In *in) {
    if (in->bad || in->at >= in->size) { in->bad = "a message cut short"; return 0; }
    return in->data[in->at++] != 0;
}

static uint32_t get_count(In *in) {
    uint32_t v = 0;
    if (in->bad || in->size - in->at < 4) { in->bad = "a message cut short"; return 0; }
    memcpy(&v, in->data + in->at, 4);
    in->at += 4;
    if (v > in->size - in->at) { in->bad = "a count larger than the datagram"; return 0; }
    return v;
}

/* A string in place (the datagram's NUL ends it): valid until the next datagram. */
static const char *get_str(In *in) {
    if (in->bad) return "";
    const uint8_t *end = memchr(in->data + in->at, 0, in->size - in->at);
    if (!end) { in->bad = "a string runs past the datagram's end"; return ""; }
    const char *s = (const char *)in->data + in->at;
    in->at = (size_t)(end - in->data) + 1;
    return s;
}

/* A list of strings, as C's argv (a NULL after the last); the pointers are into the datagram. */
static const char **get_strs(In *in, uint32_t *count) {
    uint32_t n = get_count(in);
    const char **out = need(calloc((size_t)n + 1, sizeof(char *)));
    for (uint32_t i = 0; i < n && !in->bad; i++) out[i] = get_str(in);
    if (count) *count = n;
    return out;
}

typedef struct {
    int64_t parent;
    const char *file, *text;
    int optional;
} Write;

static Write *get_writes(In *in, uint32_t *count) {
    uint32_t n = get_count(in);
    Write *out = need(calloc((size_t)n + 1, sizeof(Write)));
    for (uint32_t i = 0; i < n && !in->bad; i++) {
        out[i].parent = get_i64(in);
        out[i].file = get_str(in);
        out[i].text = get_str(in);
        out[i].optional = get_bool(in);
    }
    *count = n;
    return out;
}

typedef struct {
    const uint8_t *raw; /* the Shape's bytes on the wire: one kind of session cgroup, compared as bytes */
    size_t raw_size;
    const char **parents;
    uint32_t nparents;
    Write *limits, *after;
    uint32_t nlimits, nafter;
    const char *enter;
    int64_t top;
} Shape;

typedef struct {
    int64_t seq, umask, stdio[3], at_exit;
    const char **argv, **env;
    const char *executable, *cwd;
    int setsid;
    Shape shape;
} Spawn;

static void get_shape(In *in, Shape *s) {
    size_t start = in->at;
    s->parents = get_strs(in, &s->nparents);
    s->limits = get_writes(in, &s->nlimits);
    s->enter = get_str(in);
    s->after = get_writes(in, &s->nafter);
    s->top = get_i64(in);
    s->raw = in->data + start;
    s->raw_size = in->at - start;
}

static void free_spawn(Spawn *r) {
    free(r->argv);
    free(r->env);
    free(r->shape.parents);
    free(r->shape.limits);
    free(r->shape.after);
}

/* -- the wire: writing, in batches --------------------------------------------------- */

static struct {
    uint8_t *data;
    size_t size, cap;
    int messages;
    int fd;
} out;

static void put(const void *p, size_t n) {
    if (out.size + n > out.cap) {
        while (out.size + n > out.cap) out.cap = out.cap ? out.cap * 2 : 65536;
        out.data = need(realloc(out.data, out.cap));
    }
    memcpy(out.data + out.size, p, n);
    out.size += n;
}

static void put_u8(int v) { uint8_t b = (uint8_t)v; put(&b, 1); }
static void put_i64(int64_t v) { put(&v, 8); }
static void put_f64(double v) { put(&v, 8); }
static void put_str(const char *s) { put(s, strlen(s) + 1); }

static void put_strs(const Strs *s) {
    uint32_t n = (uint32_t)s->n;
    put(&n, 4);
    for (size_t i = 0; i < s->n; i++) put_str(s->items[i]);
}

static void flush(void) {
    if (!out.size) return;
    size_t at = 0;
    while (at < out.size) {
        ssize_t sent = send(out.fd, out.data + at, out.size - at, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR) continue;
            if (errno == EPIPE || errno == ECONNRESET) exit(0); /* gsrv is gone */
            die("cannot answer gsrv: %s", strerror(errno));
        }
        at += (size_t)sent; /* a datagram goes whole */
    }
    out.size = 0;
    out.messages = 0;
}

static void message_done(void) {
    if (++out.messages >= BATCH_MAX) flush();
}

static void hello(void) { put_u8(HELLO); put_i64(VERSION); message_done(); }

static void spawned(int64_t seq, int64_t pid, const Strs *stuck, const char *cgroup) {
    put_u8(SPAWNED); put_i64(seq); put_i64(pid); put_strs(stuck); put_str(cgroup); message_done();
}

static void failed(int64_t seq, int err, const char *why) {
    put_u8(FAILED); put_i64(seq); put_i64(err); put_str(why); message_done();
}

static void failed_at(int64_t seq, int err, const char *what) {
    char why[4096];
    snprintf(why, sizeof why, "%s: %s", strerror(err), what);
    failed(seq, err, why);
}

static void exited(int64_t pid, int64_t status, int alone) {
    put_u8(EXITED); put_i64(pid); put_i64(status); put_u8(alone ? 1 : 0); message_done();
}

static void reaped(int64_t pid, double cpu_ms, int64_t maxrss) {
    put_u8(REAPED); put_i64(pid); put_f64(cpu_ms); put_i64(maxrss); message_done();
}

static void left(const Strs *paths) { put_u8(LEFT); put_strs(paths); message_done(); }

/* -- cgroup files ------------------------------------------------------------------- */

static int write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = write(fd, text, strlen(text));
    int err = errno;
    close(fd);
    errno = err;
    return n < 0 ? -1 : 0;
}

/* rmdir a cgroup and each below it, deepest first; the ones left (busy) are added to `busy`. */
static void remove_tree(const char *top, Strs *busy) {
    if (rmdir(top) == 0 || errno == ENOENT) return;
    DIR *dir = opendir(top);
    if (dir) {
        struct dirent *e;
        Strs below = {0};
        while ((e = readdir(dir)) != NULL)
            if (e->d_type == DT_DIR && strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
                strs_add(&below, join3(top, e->d_name, ""));
        closedir(dir);
        for (size_t i = 0; i < below.n; i++) remove_tree(below.items[i], busy);
        strs_free(&below);
    }
    if (rmdir(top) != 0 && errno != ENOENT) strs_add(busy, dup_str(top));
}

/* No process left in the session's cgroup nor a cgroup below it (a zombie is not in it; a
 * file that cannot be read may hide some). */
static int cgroup_empty(const char *top) {
    if (!top || !*top) return 0;
    char *path = join3(top, "cgroup.procs", "");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    free(path);
    if (fd < 0) return errno == ENOENT;
    char buf[64];
    ssize_t n = read(fd, buf, sizeof buf);
    close(fd);
    if (n != 0) return 0; /* a process, or an error */
    struct stat st;
    if (stat(top, &st) != 0) return errno == ENOENT;
    return st.st_nlink <= 2; /* kernfs: 2 plus the cgroups below */
}

/* -- the pool: session cgroups made ahead, removed behind --------------------------------- */

typedef struct {
    uint8_t *raw;
    size_t raw_size;
    Strs parents;
    Write *limits; /* their strings copied */
    uint32_t nlimits;
    Strs ready; /* names made ahead */
    double asked;
    int *homes; /* the homes of its hierarchies (NULL: not known yet) */
    size_t nhomes;
    int all_homes; /* one could not be told: every home */
} Kind;

typedef struct {
    double due;
    int tries;
    Strs paths;
} Removal;

static struct {
    char prefix[32];
    long count;
    Kind **kinds;
    size_t nkinds;
    Removal *removals; /* due now, in order, and retries with a later due */
    size_t nremovals, cap;
    Strs left;
} pool;

static Kind *kind_of(const Shape *s) {
    for (size_t i = 0; i < pool.nkinds; i++) {
        Kind *k = pool.kinds[i];
        if (k->raw_size == s->raw_size && !memcmp(k->raw, s->raw, s->raw_size)) return k;
    }
    Kind *k = need(calloc(1, sizeof(Kind)));
    k->raw = need(malloc(s->raw_size ? s->raw_size : 1));
    memcpy(k->raw, s->raw, s->raw_size);
    k->raw_size = s->raw_size;
    for (uint32_t i = 0; i < s->nparents; i++) strs_add(&k->parents, dup_str(s->parents[i]));
    k->limits = need(calloc((size_t)s->nlimits + 1, sizeof(Write)));
    k->nlimits = s->nlimits;
    for (uint32_t i = 0; i < s->nlimits; i++) {
        k->limits[i] = s->limits[i];
        k->limits[i].file = dup_str(s->limits[i].file);
        k->limits[i].text = dup_str(s->limits[i].text);
    }
    pool.kinds = need(realloc(pool.kinds, (pool.nkinds + 1) * sizeof(Kind *)));
    pool.kinds[pool.nkinds++] = k;
    return k;
}

static void kind_free(Kind *k) {
    free(k->raw);
    strs_free(&k->parents);
    for (uint32_t i = 0; i < k->nlimits; i++) {
        free((char *)k->limits[i].file);
        free((char *)k->limits[i].text);
    }
    free(k->limits);
    strs_free(&k->ready);
    free(k->homes);
    free(k);
}

static Strs paths_of(const Strs *parents, const char *name) {
    Strs paths = {0};
    for (size_t i = 0; i < parents->n; i++) strs_add(&paths, join3(parents->items[i], name, ""));
    return paths;
}

static void pool_remove(Strs paths) { /* takes paths */
    if (pool.nremovals == pool.cap) {
        pool.cap = pool.cap ? pool.cap * 2 : 16;
        pool.removals = need(realloc(pool.removals, pool.cap * sizeof(Removal)));
    }
    pool.removals[pool.nremovals++] = (Removal){0.0, 0, paths};
}

/* A new cgroup of this kind, its name returned (malloc'd); NULL with errno and `what` set. */
static char *pool_make(Kind *k, char **what) {
    char name[64];
    for (;;) {
        snprintf(name, sizeof name, "%s%ld", pool.prefix, ++pool.count);
        char *path = join3(k->parents.items[0], name, "");
        int made = mkdir(path, 0755);
        int err = errno;
        if (made == 0) { free(path); break; }
        if (err == EEXIST) { free(path); continue; }
        *what = path;
        errno = err;
        return NULL;
    }
    Strs made = {0};
    strs_add(&made, join3(k->parents.items[0], name, ""));
    int err = 0;
    for (size_t i = 1; i < k->parents.n && !err; i++) {
        char *path = join3(k->parents.items[i], name, "");
        if (mkdir(path, 0755) != 0) { err = errno; *what = path; break; }
        strs_add(&made, path);
    }
    for (uint32_t i = 0; i < k->nlimits && !err; i++) {
        Write *w = &k->limits[i];
        if (w->parent < 0 || (size_t)w->parent >= k->parents.n) { err = EINVAL; *what = dup_str(w->file); break; }
        char *dir = join3(k->parents.items[w->parent], name, "");
        char *path = join3(dir, w->file, "");
        free(dir);
        if ((!w->optional || access(path, F_OK) == 0) && write_file(path, w->text) != 0) {
            err = errno;
            *what = path;
            break;
        }
        free(path);
    }
    if (err) {
        Strs busy = {0};
        for (size_t i = 0; i < made.n; i++) remove_tree(made.items[i], &busy);
        strs_free(&busy);
        strs_free(&made);
        errno = err;
        return NULL;
    }
    strs_free(&made);
    return dup_str(name);
}

static char *pool_take(Kind *k, char **what) {
    k->asked = now_s();
    if (k->ready.n) {
        char *name = k->ready.items[0];
        memmove(k->ready.items, k->ready.items + 1, (k->ready.n - 1) * sizeof(char *));
        k->ready.n--;
        return name;
    }
    return pool_make(k, what);
}

static void sweep(Removal r, double now) {
    Strs busy = {0};
    for (size_t i = 0; i < r.paths.n; i++) remove_tree(r.paths.items[i], &busy);
    strs_free(&r.paths);
    if (!busy.n) return;
    if (r.tries + 1 >= SWEEP_TRIES) {
        for (size_t i = 0; i < busy.n; i++) strs_add(&pool.left, busy.items[i]);
        free(busy.items);
        return;
    }
    double delay = SWEEP_FIRST_S * (double)(1 << r.tries);
    if (pool.nremovals == pool.cap) {
        pool.cap = pool.cap ? pool.cap * 2 : 16;
        pool.removals = need(realloc(pool.removals, pool.cap * sizeof(Removal)));
    }
    pool.removals[pool.nremovals++] = (Removal){now + delay, r.tries + 1, busy};
}

/* One step of idle work: a removal due, else a cgroup made ahead. Seconds until there is
 * more (0: at once), or -1 when there is none. */
static double pool_idle_work(void) {
    double now = now_s(), next = -1;
    for (size_t i = 0; i < pool.nremovals; i++) {
        if (pool.removals[i].due <= now) {
            Removal r = pool.removals[i];
            memmove(pool.removals + i, pool.removals + i + 1, (pool.nremovals - i - 1) * sizeof(Removal));
            pool.nremovals--;
            sweep(r, now);
            return 0.0;
        }
        if (next < 0 || pool.removals[i].due - now < next) next = pool.removals[i].due - now;
    }
    for (size_t i = 0; i < pool.nkinds; i++) {
        Kind *k = pool.kinds[i];
        if (now - k->asked > FORGET_S) {
            for (size_t j = 0; j < k->ready.n; j++) pool_remove(paths_of(&k->parents, k->ready.items[j]));
            pool.kinds[i] = pool.kinds[--pool.nkinds];
            kind_free(k);
            return 0.0;
        }
        if (k->ready.n < READY) {
            char *what = NULL;
            char *name = pool_make(k, &what);
            free(what);
            if (name) strs_add(&k->ready, name);
            else k->asked = 0.0; /* the next spawn makes its own, and says why if it cannot */
            return 0.0;
        }
    }
    return next;
}

/* -- the children --------------------------------------------------------------------- */

typedef struct {
    int pid, pidfd; /* pidfd -1: not watched (out of fds): polled */
    int mode, reap_at_exit;
    char *top;
    Strs paths;
} Child;

static struct {
    Child *items;
    size_t n, cap;
} children;

static int control_fd, epoll_fd, devnull_fd, cwd_fd;
static int *homes;
static size_t nhomes;
static dev_t *home_devs;
static int unwatched;

static Child *child_of(int pid) {
    for (size_t i = 0; i < children.n; i++)
        if (children.items[i].pid == pid) return &children.items[i];
    return NULL;
}

static Child *child_add(int pid) {
    if (children.n == children.cap) {
        children.cap = children.cap ? children.cap * 2 : 64;
        children.items = need(realloc(children.items, children.cap * sizeof(Child)));
    }
    Child *c = &children.items[children.n++];
    memset(c, 0, sizeof *c);
    c->pid = pid;
    c->pidfd = -1;
    return c;
}

/* Forget a child: its pidfd closed (epoll forgets it), its record gone; its mode returned. */
static void child_forget(Child *c, int *mode, char **top, Strs *paths) {
    if (c->pidfd >= 0) close(c->pidfd);
    else unwatched--;
    if (mode) *mode = c->mode;
    if (top) *top = c->top; else free(c->top);
    if (paths) *paths = c->paths; else strs_free(&c->paths);
    *c = children.items[--children.n];
}

static int64_t status_word(const siginfo_t *info) {
    if (info->si_code == CLD_EXITED) return (int64_t)((info->si_status & 0xFF) << 8);
    return (int64_t)(info->si_status | (info->si_code == CLD_DUMPED ? 0x80 : 0));
}

static void reap(int pid);

/* Its Exited; the reap at once where gsrv asked for it before, or at_exit allows it. */
static void report_exit(Child *c, int64_t status) {
    int pid = c->pid, asked = c->reap_at_exit, mode;
    char *top;
    Strs paths;
    child_forget(c, &mode, &top, &paths);
    if (asked) {
        exited(pid, status, 0);
        reap(pid);
    } else {
        int alone = (mode == REAP_IF_EMPTY || mode == REAP_AND_REMOVE_IF_EMPTY) && cgroup_empty(top);
        exited(pid, status, alone);
        if (mode == AT_EXIT_REAP || alone) reap(pid);
        if (alone && mode == REAP_AND_REMOVE_IF_EMPTY) {
            pool_remove(paths);
            paths = (Strs){0};
        }
    }
    free(top);
    strs_free(&paths);
}

/* gsrv is done with it (or at_exit allows it): wait4 for its rusage; one still running is
 * reaped at its exit; pid 0: reaped at its exit already. */
static void reap(int pid) {
    if (pid <= 0) return;
    int status = 0;
    struct rusage ru;
    pid_t found = wait4(pid, &status, WNOHANG, &ru);
    if (found < 0) return; /* not ours (reaped): nothing */
    Child *c = child_of(pid);
    if (found == 0) {
        if (!c) { c = child_add(pid); unwatched++; } /* no pidfd for it: polled */
        c->reap_at_exit = 1;
        return;
    }
    if (c) { /* its exit not reported yet (it came with this request): now */
        child_forget(c, NULL, NULL, NULL);
        exited(pid, status, 0);
    }
    double cpu = (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000.0
                 + (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1000.0;
    reaped(pid, round(cpu * 10.0) / 10.0, ru.ru_maxrss);
}

/* A pidfd became readable: its child exited. An event of a batch may be stale (the pidfd
 * closed by a reap in the same batch, its number a new child's): then nothing. */
static void on_exit_event(int pidfd, int pid) {
    Child *c = child_of(pid);
    if (!c || c->pidfd != pidfd) return;
    siginfo_t info;
    memset(&info, 0, sizeof info);
    if (waitid((idtype_t)P_PIDFD_, (id_t)pidfd, &info, WEXITED | WNOWAIT | WNOHANG) != 0) {
        child_forget(c, NULL, NULL, NULL); /* reaped already: its exit came with the reap */
        return;
    }
    if (info.si_pid == 0) return; /* not exited: still watched */
    report_exit(c, status_word(&info));
}

static void poll_unwatched(void) {
    for (size_t i = 0; i < children.n;) {
        Child *c = &children.items[i];
        if (c->pidfd >= 0) { i++; continue; }
        siginfo_t info;
        memset(&info, 0, sizeof info);
        if (waitid(P_PID, (id_t)c->pid, &info, WEXITED | WNOWAIT | WNOHANG) != 0) {
            child_forget(c, NULL, NULL, NULL);
            continue;
        }
        if (info.si_pid) { report_exit(c, status_word(&info)); continue; }
        i++;
    }
}

/* -- a spawn ------------------------------------------------------------------------------ */

static int go_home(Kind *k, const char *name, const Shape *shape, Strs *stuck) {
    char what[4200];
    for (uint32_t i = 0; i < shape->nafter; i++) { /* the pids limit back down: the spawner counted there */
        const Write *w = &shape->after[i];
        if (w->parent < 0 || (size_t)w->parent >= k->parents.n) continue;
        char *dir = join3(k->parents.items[w->parent], name, "");
        char *path = join3(dir, w->file, "");
        free(dir);
        if (write_file(path, w->text) != 0) {
            snprintf(what, sizeof what, "%s: %s", path, strerror(errno));
            strs_add(stuck, dup_str(what));
        }
        free(path);
    }
    if (!k->homes && !k->all_homes) { /* the homes of its hierarchies, found by their file systems */
        k->homes = need(calloc(k->parents.n + 1, sizeof(int)));
        for (size_t i = 0; i < k->parents.n && !k->all_homes; i++) {
            struct stat st;
            size_t j = 0;
            if (stat(k->parents.items[i], &st) == 0)
                while (j < nhomes && home_devs[j] != st.st_dev) j++;
            if (j == nhomes) { k->all_homes = 1; break; }
            size_t seen = 0;
            while (seen < k->nhomes && k->homes[seen] != homes[j]) seen++;
            if (seen == k->nhomes) k->homes[k->nhomes++] = homes[j];
        }
    }
    size_t n = k->all_homes ? nhomes : k->nhomes;
    for (size_t i = 0; i < n; i++) {
        int fd = k->all_homes ? homes[i] : k->homes[i];
        if (write(fd, "0", 1) < 0) {
            snprintf(what, sizeof what, "home %d: %s", fd, strerror(errno));
            strs_add(stuck, dup_str(what));
        }
    }
    return 0;
}

static void start(const Spawn *r, const int *fds, int nfds, int truncated) {
    if (truncated) { /* the kernel dropped fds it could not install here: out of fds */
        failed(r->seq, EMFILE, "the spawner is out of file descriptors");
        return;
    }
    for (int n = 0; n < 3; n++)
        if (r->stdio[n] >= nfds) { failed(r->seq, EINVAL, "a stdio index names no fd sent with the request"); return; }
    Kind *k = NULL;
    char *name = NULL, *what = NULL;
    if (r->shape.nparents) {
        k = kind_of(&r->shape);
        name = pool_take(k, &what);
        if (!name) {
            int err = errno;
            failed_at(r->seq, err, what ? what : "a session cgroup");
            free(what);
            return;
        }
    }
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attr;
    posix_spawn_file_actions_init(&actions);
    posix_spawnattr_init(&attr);
    for (int n = 0; n < 3; n++)
        posix_spawn_file_actions_adddup2(&actions, r->stdio[n] < 0 ? devnull_fd : fds[r->stdio[n]], n);
    sigset_t defaults;
    sigemptyset(&defaults);
    sigaddset(&defaults, SIGPIPE);
    sigaddset(&defaults, SIGXFSZ);
    posix_spawnattr_setsigdefault(&attr, &defaults);
    posix_spawnattr_setflags(&attr, (short)(POSIX_SPAWN_SETSIGDEF | (r->setsid ? POSIX_SPAWN_SETSID : 0)));
    mode_t old_umask = 0;
    if (r->umask >= 0) old_umask = umask((mode_t)r->umask);
    int err = 0, entered = 0;
    pid_t pid = 0;
    const char *failed_on = r->executable;
    char *enter_path = NULL;
    if (*r->cwd && chdir(r->cwd) != 0) { err = errno; failed_on = r->cwd; }
    for (size_t i = 0; k && !err && i < k->parents.n; i++) {
        entered = 1;
        enter_path = join3(k->parents.items[i], name, r->shape.enter);
        if (write_file(enter_path, "0") != 0) { err = errno; failed_on = enter_path; break; } /* "0": this process */
        free(enter_path);
        enter_path = NULL;
    }
    if (!err) err = posix_spawn(&pid, r->executable, &actions, &attr, (char *const *)r->argv, (char *const *)r->env);
    Strs stuck = {0};
    if (entered) go_home(k, name, &r->shape, &stuck);
    if (r->umask >= 0) umask(old_umask);
    if (*r->cwd) (void)fchdir(cwd_fd);
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
    if (err) {
        failed_at(r->seq, err, failed_on);
        free(enter_path);
        if (name) pool_remove(paths_of(&k->parents, name));
        free(name);
        strs_free(&stuck);
        return;
    }
    spawned(r->seq, pid, &stuck, name ? name : "");
    strs_free(&stuck);
    Child *c = child_add(pid);
    c->mode = (int)r->at_exit;
    if (name && r->at_exit != HOLD) {
        c->paths = paths_of(&k->parents, name);
        if (r->shape.top >= 0 && (size_t)r->shape.top < c->paths.n) c->top = dup_str(c->paths.items[r->shape.top]);
    }
    free(name);
    c->pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (c->pidfd < 0) { unwatched++; return; }
    fcntl(c->pidfd, F_SETFD, FD_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = ((uint64_t)(uint32_t)pid << 32) | (uint32_t)c->pidfd};
    if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, c->pidfd, &ev) != 0) { close(c->pidfd); c->pidfd = -1; unwatched++; }
}

/* -- gsrv's requests ---------------------------------------------------------------------- */

static uint8_t buffer[MESSAGE_MAX];
static int greeted;

static const char *kind_name(int kind) {
    static const char *names[] = {"?", "Hello", "Spawn", "Reap", "Spawned", "Failed", "Exited", "Reaped", "Left"};
    return kind >= 1 && kind <= 8 ? names[kind] : "?";
}

static void handle(In *in, const int *fds, int nfds, int truncated) {
    while (in->at < in->size) {
        int kind = in->data[in->at++];
        if (!greeted) {
            int64_t version = kind == HELLO ? get_i64(in) : -1;
            if (kind != HELLO || version != VERSION)
                die("gsrv's first message is %s(%lld): this spawner speaks wire version %d", kind_name(kind),
                    (long long)version, VERSION);
            greeted = 1;
            continue;
        }
        switch (kind) {
        case HELLO: get_i64(in); break;
        case SPAWN: {
            Spawn r;
            memset(&r, 0, sizeof r);
            r.seq = get_i64(in);
            r.argv = get_strs(in, NULL);
            r.executable = get_str(in);
            r.env = get_strs(in, NULL);
            r.cwd = get_str(in);
            r.umask = get_i64(in);
            for (int i = 0; i < 3; i++) r.stdio[i] = get_i64(in);
            r.setsid = get_bool(in);
            get_shape(in, &r.shape);
            r.at_exit = get_i64(in);
            if (!in->bad) start(&r, fds, nfds, truncated);
            free_spawn(&r);
            break;
        }
        case REAP: {
            int64_t pid = get_i64(in);
            uint32_t n;
            const char **cgroups = get_strs(in, &n);
            if (!in->bad) {
                reap((int)pid);
                if (n) {
                    Strs paths = {0};
                    for (uint32_t i = 0; i < n; i++) strs_add(&paths, dup_str(cgroups[i]));
                    pool_remove(paths);
                }
            }
            free(cgroups);
            break;
        }
        case SPAWNED: get_i64(in); get_i64(in); free(get_strs(in, NULL)); get_str(in); break; /* not gsrv's */
        case FAILED: get_i64(in); get_i64(in); get_str(in); break;
        case EXITED: get_i64(in); get_i64(in); get_bool(in); break;
        case REAPED: get_i64(in); get_f64(in); get_i64(in); break;
        case LEFT: free(get_strs(in, NULL)); break;
        default: die("no message of kind %d in wire version %d", kind, VERSION);
        }
        if (in->bad) die("%s", in->bad);
    }
}

/* Every request waiting; 0 at EOF (gsrv is gone). */
static int requests(void) {
    for (;;) {
        struct iovec iov = {buffer, sizeof buffer};
        union {
            struct cmsghdr align;
            char space[CMSG_SPACE(FDS_MAX * sizeof(int))];
        } control;
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space,
                             .msg_controllen = sizeof control.space};
        ssize_t size = recvmsg(control_fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (size < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) return 1;
            return 0;
        }
        int fds[FDS_MAX], nfds = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
                for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int) && nfds < FDS_MAX; i++)
                    memcpy(&fds[nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        if (size == 0 && nfds == 0) return 0;
        In in = {buffer, (size_t)size, 0, NULL};
        handle(&in, fds, nfds, (msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC)) != 0);
        for (int i = 0; i < nfds; i++) close(fds[i]);
    }
}

int main(int argc, char **argv) {
    if (argc < 3) die("usage: gsrv-spawner CONTROL_FD GENERATION HOME...");
    control_fd = atoi(argv[1]);
    fcntl(control_fd, F_SETFD, FD_CLOEXEC);
    out.fd = control_fd;
    snprintf(pool.prefix, sizeof pool.prefix, "c%s-", argv[2]);
    devnull_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
    cwd_fd = open(".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    nhomes = (size_t)(argc - 3);
    homes = need(calloc(nhomes + 1, sizeof(int)));
    home_devs = need(calloc(nhomes + 1, sizeof(dev_t)));
    for (size_t i = 0; i < nhomes; i++) {
        homes[i] = open(argv[3 + i], O_WRONLY | O_CLOEXEC);
        if (homes[i] < 0) die("cannot open its home %s: %s", argv[3 + i], strerror(errno));
        struct stat st;
        home_devs[i] = fstat(homes[i], &st) == 0 ? st.st_dev : (dev_t)-1;
    }
    epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)(uint32_t)control_fd};
    if (epoll_fd < 0 || epoll_ctl(epoll_fd, EPOLL_CTL_ADD, control_fd, &ev) != 0) die("epoll: %s", strerror(errno));
    for (size_t i = 0; i < nhomes; i++) (void)!write(homes[i], "0", 1); /* v2: into its own leaf */
    hello();
    flush();
    double idle = -1;
    struct epoll_event events[256];
    for (;;) {
        int timeout = idle < 0 ? -1 : (int)ceil(idle * 1000);
        if (unwatched && (timeout < 0 || timeout > POLL_UNWATCHED_MS)) timeout = POLL_UNWATCHED_MS;
        int n = epoll_wait(epoll_fd, events, 256, timeout);
        if (n < 0) {
            if (errno != EINTR) die("epoll_wait: %s", strerror(errno));
            n = 0;
        }
        for (int i = 0; i < n; i++) {
            uint64_t data = events[i].data.u64;
            int pid = (int)(data >> 32), fd = (int)(uint32_t)data;
            if (pid == 0) {
                if (!requests()) { flush(); return 0; }
            } else {
                on_exit_event(fd, pid);
            }
        }
        if (unwatched) poll_unwatched();
        if (pool.left.n) {
            left(&pool.left);
            strs_free(&pool.left);
        }
        flush();
        idle = n ? 0.0 : pool_idle_work();
    }
}
