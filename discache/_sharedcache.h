/* SharedCache's shared-memory layout and the C halves of its operations (see docs/shared-cache.md).
 *
 * One file in /dev/shm, mapped MAP_SHARED by every attached process:
 *   page 0          header: geometry, the writer's dirty word, the move sequence, host-wide counts
 *   counter slots   one 64-byte slot of hit/miss counters per attached instance
 *   bitmap          one bit per data page (1 = owned by a live entry)
 *   index           open-addressing hash table (linear probing) of 128-byte records
 *   data            the entries' pages: value first, then the key when it is too long to inline
 *
 * Readers take no lock and make no system call: a record's `seq` is a sequence lock (odd while a
 * writer changes the record or its pages); a reader copies under it and checks it did not move.
 * Writers serialize on an OFD write lock of byte 0 of the file (the kernel drops it when the
 * holder dies) and set `dirty` while they change anything; the next writer that finds it set
 * repairs the index from what it holds (sc_repair).  Every pointer a reader computes from a
 * record is bounds-checked before use: a torn read may show any numbers, never a wild access. */
#ifndef DISCACHE_SHAREDCACHE_H
#define DISCACHE_SHAREDCACHE_H

/* only the OFD-lock helpers of the shared kernel header are used here */
#pragma GCC diagnostic ignored "-Wunused-function"
#include "_dckernel.h"
#include <stdlib.h>
#include <time.h>
#include <linux/falloc.h>

#define SC_MAGIC 0x3145484341435344ULL /* "DSCACHE1" */
#define SC_VERSION 1
#define SC_INLINE_KEY 64
#define SC_EMPTY 0
#define SC_LIVE 1
#define SC_PURGED 2                    /* a marker: the key's entry was purged */
#define SC_KIND_BYTES 0
#define SC_KIND_STR 1
#define SC_FLAG_KEY_INLINE 0x100
#define SC_SLOTS 256                   /* counter slots; one more is shared by the rest */
#define SC_LOCK_WRITER 0               /* lock bytes of the file (beyond its end is fine) */
#define SC_LOCK_SLOT_BASE (1ULL << 39)
#define SC_LOCK_PIN_BASE (1ULL << 40)
#define SC_READ_RETRIES 16
#define SC_SPINS 2000
#define SC_SLACK_DIVISOR 64             /* eviction frees this fraction of the pages beyond need */
#define SC_TOUCH_NS 1000000ULL         /* a hit refreshes its entry's time at most once a ms */

/* reasons an entry left the cache (evictions_* counters) */
#define SC_WHY_SIZE 0
#define SC_WHY_PURGED 1
#define SC_WHY_EXPLICIT 2

typedef struct {
    uint64_t seq;          /* sequence lock: odd while the record or its pages change */
    uint64_t atime;        /* CLOCK_MONOTONIC ns of the last set or hit (relaxed) */
    uint64_t hash;
    uint32_t state;        /* SC_EMPTY, SC_LIVE, SC_PURGED */
    uint32_t flags;        /* key kind | SC_FLAG_KEY_INLINE */
    uint64_t first_page;
    uint32_t npages;
    uint32_t keylen;
    uint64_t vallen;
    uint64_t checksum;     /* of the value */
    unsigned char key[SC_INLINE_KEY];
} sc_record;

typedef struct {
    uint64_t magic;
    uint32_t version;
    uint32_t page;
    uint64_t maxsize;
    uint64_t data_pages;
    uint64_t capacity;     /* records, a power of two */
    uint64_t slots_off, bitmap_off, index_off, data_off, file_size;
    uint64_t idle_ns;      /* an entry idle this long is unlocked (purgeable under pressure) */
    uint64_t created_ns;
    uint64_t pad0[3];
    /* changed under the writer lock */
    uint64_t dirty;        /* non-zero while a writer changes anything */
    uint64_t move_seq;     /* odd while records move (a reader's miss is then retried) */
    uint64_t live, markers, used_pages, alloc_hint;
    uint64_t purged_bytes, purged_entries, sets, recoveries;
    uint64_t evictions[3];
    uint64_t pins_hint;    /* pins taken minus released (a dead pinner leaves it high: harmless) */
    uint64_t pressure_events[2];
} sc_header;

typedef struct {
    uint64_t hits, misses, purges_detected, checksum_failures;
    uint64_t pad[4];
} sc_slot;

typedef struct {
    char *base;
    size_t mapped;
    sc_header *hdr;
    sc_slot *slots;
    uint64_t *bitmap;
    sc_record *recs;
    char *data;
    uint64_t mask;
    uint64_t page;
    uint64_t data_pages;
    int fd;          /* this instance's open file description: writer lock, pins, slot */
    int probe_fd;    /* another description: tests whether any pin (ours too) holds a page */
} sc_map;

/* ---- hashing (keys, and the values' checksums) ---- */

static inline uint64_t sc_rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t sc_fmix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static inline uint64_t sc_word(const unsigned char *p) {
    uint64_t w;
    memcpy(&w, p, 8);
    return w;
}

/* Four independent lanes over 32-byte blocks (the multiplies overlap), then the tail. */
static uint64_t sc_hash(const unsigned char *p, size_t n, uint64_t seed) {
    const uint64_t k1 = 0x9E3779B97F4A7C15ULL, k2 = 0xC2B2AE3D27D4EB4FULL;
    uint64_t a = seed ^ k1, b = seed ^ k2, c = seed + k1, d = seed - k2;
    uint64_t h;
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a = sc_rotl(a ^ (sc_word(p + i) * k2), 31) * k1;
        b = sc_rotl(b ^ (sc_word(p + i + 8) * k2), 31) * k1;
        c = sc_rotl(c ^ (sc_word(p + i + 16) * k2), 31) * k1;
        d = sc_rotl(d ^ (sc_word(p + i + 24) * k2), 31) * k1;
    }
    h = sc_rotl(a, 1) + sc_rotl(b, 7) + sc_rotl(c, 12) + sc_rotl(d, 18) + (uint64_t)n * k1;
    for (; i + 8 <= n; i += 8)
        h = sc_rotl(h ^ (sc_word(p + i) * k2), 27) * k1 + 0x52dce729;
    if (i < n) {
        uint64_t w = 0;
        memcpy(&w, p + i, n - i);
        h = sc_rotl(h ^ (w * k2), 23) * k1 + 0x38495ab5;
    }
    return sc_fmix(h);
}

static inline uint64_t sc_key_hash(const unsigned char *key, size_t n, uint32_t kind) {
    return sc_hash(key, n, 0x6b65790000000000ULL | kind);
}

static inline uint64_t sc_checksum(const unsigned char *value, size_t n) {
    return sc_hash(value, n, 0x76616c7565ULL);
}

static inline uint64_t sc_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);  /* the vDSO: no system call */
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static inline void sc_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
#endif
}

/* ---- the sequence lock ---- */

static inline uint64_t sc_read_begin(const sc_record *r) {
    return __atomic_load_n(&r->seq, __ATOMIC_ACQUIRE);
}

/* Did the record stay as it was when read_begin returned `seq`?  (Everything read in between,
 * the value's pages included, is then consistent.) */
static inline int sc_read_valid(const sc_record *r, uint64_t seq) {
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return __atomic_load_n(&r->seq, __ATOMIC_RELAXED) == seq;
}

static inline void sc_write_begin(sc_record *r) {
    __atomic_store_n(&r->seq, r->seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

static inline void sc_write_end(sc_record *r) {
    __atomic_store_n(&r->seq, r->seq + 1, __ATOMIC_RELEASE);
}

static inline void sc_move_begin(sc_header *h) {
    __atomic_store_n(&h->move_seq, h->move_seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

static inline void sc_move_end(sc_header *h) {
    __atomic_store_n(&h->move_seq, h->move_seq + 1, __ATOMIC_RELEASE);
}

/* ---- reading without a lock ---- */

/* What a reader copied of a record, under its sequence lock. */
typedef struct {
    uint64_t index, seq, first_page, vallen, checksum;
    uint32_t state, npages;
} sc_found;

#define SC_FIND_MISS 0
#define SC_FIND_LIVE 1
#define SC_FIND_PURGED 2
#define SC_FIND_STUCK 3   /* a miss, after a record stayed odd: its writer may have died */

/* Are the record's numbers possible (a torn read may show anything)?  Then every pointer made
 * from them lies inside the data area. */
static inline int sc_sane(const sc_map *m, uint64_t first, uint64_t npages, uint64_t vallen,
                          uint64_t keylen, uint32_t flags) {
    uint64_t inline_key = flags & SC_FLAG_KEY_INLINE;
    if (first > m->data_pages || npages > m->data_pages - first)
        return 0;
    if (inline_key ? keylen > SC_INLINE_KEY : 0)
        return 0;
    if (vallen > npages * m->page || (!inline_key && keylen > npages * m->page - vallen))
        return 0;
    return 1;
}

/* Does record r (read under seq) hold this key?  Reads the data area for a long key. */
static inline int sc_key_matches(const sc_map *m, const sc_record *r, uint64_t hash, uint32_t kind,
                                 const unsigned char *key, size_t keylen, sc_found *f) {
    uint32_t flags = __atomic_load_n(&r->flags, __ATOMIC_RELAXED);
    if (r->hash != hash || r->keylen != keylen || (flags & 0xff) != kind)
        return 0;
    f->first_page = r->first_page;
    f->npages = r->npages;
    f->vallen = r->vallen;
    f->checksum = r->checksum;
    if (!sc_sane(m, f->first_page, f->npages, f->vallen, keylen, flags))
        return 0;
    if (flags & SC_FLAG_KEY_INLINE)
        return memcmp(r->key, key, keylen) == 0;
    return memcmp(m->data + f->first_page * m->page + f->vallen, key, keylen) == 0;
}

/* Find key; fills *f (its record, sequence and numbers, to be re-checked with sc_read_valid after
 * the value is copied).  A miss is retried while records moved under it (a delete's shift). */
static int sc_find(const sc_map *m, uint64_t hash, uint32_t kind,
                   const unsigned char *key, size_t keylen, sc_found *f) {
    const sc_header *h = m->hdr;
    int attempt, spins, stuck = 0;
    for (attempt = 0; attempt < SC_READ_RETRIES; attempt++) {
        uint64_t moves = __atomic_load_n(&h->move_seq, __ATOMIC_ACQUIRE);
        uint64_t i = hash & m->mask, probed;
        for (probed = 0; probed <= m->mask; probed++, i = (i + 1) & m->mask) {
            const sc_record *r = m->recs + i;
            uint64_t seq = sc_read_begin(r);
            for (spins = 0; (seq & 1) && spins < SC_SPINS; spins++) {
                sc_cpu_relax();
                seq = sc_read_begin(r);
            }
            if (seq & 1) {
                stuck = 1;
                break;  /* a writer is stuck (died?): give up this attempt */
            }
            uint32_t state = __atomic_load_n(&r->state, __ATOMIC_RELAXED);
            if (state == SC_EMPTY) {
                if (!sc_read_valid(r, seq))
                    break;
                __atomic_thread_fence(__ATOMIC_ACQUIRE);
                if (!(moves & 1) && __atomic_load_n(&h->move_seq, __ATOMIC_RELAXED) == moves)
                    return SC_FIND_MISS;
                break;
            }
            if (sc_key_matches(m, r, hash, kind, key, keylen, f)) {
                if (!sc_read_valid(r, seq))
                    break;
                f->index = i;
                f->seq = seq;
                f->state = state;
                return state == SC_LIVE ? SC_FIND_LIVE : SC_FIND_PURGED;
            }
        }
        if (stuck)
            return SC_FIND_STUCK;
        sc_cpu_relax();
    }
    return SC_FIND_MISS;
}

/* ---- writing, under the writer lock ---- */

static inline uint64_t sc_bytes_of(const sc_map *m, uint64_t npages) { return npages * m->page; }

static inline int sc_page_used(const sc_map *m, uint64_t p) {
    return (m->bitmap[p >> 6] >> (p & 63)) & 1;
}

static void sc_mark_pages(sc_map *m, uint64_t first, uint64_t n, int used) {
    for (uint64_t p = first; p < first + n; p++) {
        if (used)
            m->bitmap[p >> 6] |= 1ULL << (p & 63);
        else
            m->bitmap[p >> 6] &= ~(1ULL << (p & 63));
    }
}

static void sc_punch(sc_map *m, uint64_t first, uint64_t n) {
    if (n)
        fallocate(m->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  (off_t)(m->hdr->data_off + first * m->page), (off_t)(n * m->page));
}

static void sc_free_pages(sc_map *m, uint64_t first, uint64_t n) {
    if (!n)
        return;
    sc_mark_pages(m, first, n, 0);
    sc_punch(m, first, n);
    m->hdr->used_pages -= n;
}

/* First fit of n free pages from the allocation hint; the first page, or -1. */
static int64_t sc_alloc_pages(sc_map *m, uint64_t n) {
    uint64_t total = m->data_pages, start = m->hdr->alloc_hint, tried = 0, p, run;
    if (n == 0)
        return 0;
    if (n > total || m->hdr->used_pages + n > total)
        return -1;
    if (start >= total)
        start = 0;
    p = start;
    while (tried < total) {
        if (p + n > total) {  /* no run wraps around the end */
            tried += total - p;
            p = 0;
            continue;
        }
        for (run = 0; run < n && !sc_page_used(m, p + run); run++)
            ;
        if (run == n) {
            sc_mark_pages(m, p, n, 1);
            m->hdr->used_pages += n;
            m->hdr->alloc_hint = p + n;
            return (int64_t)p;
        }
        tried += run + 1;
        p += run + 1;
        if (p >= total)
            p = 0;
    }
    return -1;
}

/* Is the entry pinned by a view in any process (ours too: the probe is another description)?
 * Only a hint for statistics: a change must claim the record with sc_claim. */
static int sc_pinned(const sc_map *m, const sc_record *r) {
    if (r->npages == 0 || __atomic_load_n(&m->hdr->pins_hint, __ATOMIC_RELAXED) == 0)
        return 0;
    return dc_ofd_byte_held(m->probe_fd, SC_LOCK_PIN_BASE + r->first_page) != 0;
}

/* Begin changing live record r: its sequence goes odd, then, if any pin may exist, the write
 * lock of its pin byte is taken through the probe description (a pin is a read lock of that
 * byte, so this fails while any process, ours included, pins the entry).  The order closes the
 * race with a pinner, which counts itself in pins_hint, takes its read lock, then re-checks the
 * sequence: either it sees ours move, or we see its count (both sides fence in between).
 * 1: claimed, end with sc_release; 0: pinned, the record is left as it was. */
static int sc_claim(sc_map *m, sc_record *r, int *pin_locked) {
    *pin_locked = 0;
    sc_write_begin(r);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (r->npages == 0 || __atomic_load_n(&m->hdr->pins_hint, __ATOMIC_SEQ_CST) == 0)
        return 1;
    if (dc_ofd_lock_byte(m->probe_fd, SC_LOCK_PIN_BASE + r->first_page) != 0) {
        sc_write_end(r);  /* readers retry once; nothing changed */
        return 0;
    }
    *pin_locked = 1;
    return 1;
}

static void sc_release(sc_map *m, sc_record *r, uint64_t pin_page, int pin_locked) {
    sc_write_end(r);
    if (pin_locked) {
        struct flock fl;
        dc_ofd_byte(&fl, SC_LOCK_PIN_BASE + pin_page);
        fl.l_type = F_UNLCK;
        fcntl(m->probe_fd, F_OFD_SETLK, &fl);
    }
}

/* The writer's lookup (no sequence lock needed): the record of the key, or -1 and *empty, the
 * first empty record of its probe sequence. */
static int64_t sc_w_find(const sc_map *m, uint64_t hash, uint32_t kind,
                         const unsigned char *key, size_t keylen, int64_t *empty) {
    uint64_t i = hash & m->mask, probed;
    sc_found f;
    *empty = -1;
    for (probed = 0; probed <= m->mask; probed++, i = (i + 1) & m->mask) {
        const sc_record *r = m->recs + i;
        if (r->state == SC_EMPTY) {
            *empty = (int64_t)i;
            return -1;
        }
        if (sc_key_matches(m, r, hash, kind, key, keylen, &f))
            return (int64_t)i;
    }
    return -1;
}

/* Live -> purged marker: the pages are punched (host-wide free), every reader sees the change.
 * 1 purged, 0 pinned (left alone). */
static int sc_purge_record(sc_map *m, uint64_t i, int why) {
    sc_record *r = m->recs + i;
    sc_header *h = m->hdr;
    uint64_t page = r->first_page;
    int pin_locked;
    if (!sc_claim(m, r, &pin_locked))
        return 0;
    sc_free_pages(m, r->first_page, r->npages);
    h->purged_bytes += sc_bytes_of(m, r->npages);
    h->purged_entries += 1;
    h->evictions[why] += 1;
    h->live -= 1;
    h->markers += 1;
    r->state = SC_PURGED;  /* a long key lived in the pages: its marker matches nothing */
    r->npages = 0;
    r->vallen = 0;
    sc_release(m, r, page, pin_locked);
    return 1;
}

static uint64_t sc_home(const sc_map *m, const sc_record *r) { return r->hash & m->mask; }

/* Empty record i, shifting the records after it back so no probe sequence has a hole.  Each moved
 * record is written under its sequence lock; move_seq tells readers that a miss may be false. */
static void sc_remove_record(sc_map *m, uint64_t i) {
    sc_header *h = m->hdr;
    uint64_t j = i, k;
    sc_move_begin(h);
    for (;;) {
        j = (j + 1) & m->mask;
        sc_record *rj = m->recs + j;
        if (rj->state == SC_EMPTY)
            break;
        k = sc_home(m, rj);
        /* rj may move to i when its home is not cyclically in (i, j] */
        int stays = (i <= j) ? (i < k && k <= j) : (i < k || k <= j);
        if (stays)
            continue;
        sc_record *ri = m->recs + i;
        sc_write_begin(ri);
        memcpy((char *)ri + 8, (char *)rj + 8, sizeof(sc_record) - 8);
        sc_write_end(ri);
        i = j;
    }
    sc_record *ri = m->recs + i;
    sc_write_begin(ri);
    ri->state = SC_EMPTY;
    ri->hash = 0;
    ri->npages = 0;
    ri->keylen = 0;
    ri->vallen = 0;
    ri->flags = 0;
    sc_write_end(ri);
    sc_move_end(h);
}

/* Drop a live or purged record for good (del, pop, clear, old markers).  1 done, 0 pinned. */
static int sc_delete_record(sc_map *m, uint64_t i, int why) {
    sc_record *r = m->recs + i;
    uint64_t page = r->first_page;
    int pin_locked;
    if (r->state == SC_LIVE) {
        if (!sc_claim(m, r, &pin_locked))
            return 0;
        r->state = SC_PURGED;  /* readers racing the punch below see a change, then a marker */
        sc_free_pages(m, r->first_page, r->npages);
        r->npages = 0;
        r->vallen = 0;
        sc_release(m, r, page, pin_locked);
        m->hdr->live -= 1;
        m->hdr->evictions[why] += 1;
    } else {
        m->hdr->markers -= 1;
    }
    sc_remove_record(m, i);
    return 1;
}

/* Drop every unpinned entry and every marker; the number of pinned entries left. */
static uint64_t sc_clear(sc_map *m) {
    uint64_t i = 0, visited = 0, kept = 0;
    while (visited <= m->mask) {
        if (m->recs[i].state != SC_EMPTY && sc_delete_record(m, i, SC_WHY_EXPLICIT))
            continue;  /* something may have moved into i */
        if (m->recs[i].state == SC_LIVE)
            kept++;
        i = (i + 1) & m->mask;
        visited++;
    }
    return kept;
}

/* Drop every purged marker (they only serve to report purges to readers). */
static void sc_drop_markers(sc_map *m) {
    uint64_t i = 0, visited = 0;
    while (visited <= m->mask && m->hdr->markers) {
        if (m->recs[i].state == SC_PURGED) {
            sc_delete_record(m, i, SC_WHY_EXPLICIT);
            continue;  /* something may have moved into i */
        }
        i = (i + 1) & m->mask;
        visited++;
    }
}

typedef struct { uint64_t atime, index; } sc_age;

static int sc_age_cmp(const void *a, const void *b) {
    uint64_t x = ((const sc_age *)a)->atime, y = ((const sc_age *)b)->atime;
    return x < y ? -1 : x > y;
}

/* Live records, least recently used first (malloc'd; *n of them), or NULL. */
static sc_age *sc_lru_order(const sc_map *m, uint64_t *n) {
    sc_age *ages = malloc((m->hdr->live + 1) * sizeof(sc_age));
    uint64_t i, count = 0;
    if (ages == NULL)
        return NULL;
    for (i = 0; i <= m->mask && count < m->hdr->live; i++) {
        if (m->recs[i].state == SC_LIVE) {
            ages[count].atime = __atomic_load_n(&m->recs[i].atime, __ATOMIC_RELAXED);
            ages[count].index = i;
            count++;
        }
    }
    qsort(ages, count, sizeof(sc_age), sc_age_cmp);
    *n = count;
    return ages;
}

/* Purge unpinned live entries, oldest first, until `enough` says stop; entries touched after
 * `older_than` are kept.  Records do not move (they become markers).  Returns bytes purged, or
 * -1 when out of memory. */
typedef int (*sc_enough_fn)(const sc_map *m, uint64_t want);

static int sc_never_enough(const sc_map *m, uint64_t want) { (void)m; (void)want; return 0; }

/* Live records up to 5/8 of the index: entries of one page or more never reach it (the index
 * has 2 records per data page), entries of no page (empty values) may. */
static int sc_records_room(const sc_map *m, uint64_t want) {
    return m->hdr->live + want <= (m->mask + 1) / 8 * 5;
}

static int64_t sc_purge_lru(sc_map *m, sc_enough_fn enough, uint64_t want, uint64_t older_than,
                            int why) {
    uint64_t n, k;
    int64_t purged = 0;
    sc_age *ages;
    if (enough(m, want))
        return 0;
    ages = sc_lru_order(m, &n);
    if (ages == NULL)
        return -1;
    for (k = 0; k < n && !enough(m, want); k++) {
        sc_record *r = m->recs + ages[k].index;
        uint64_t bytes = sc_bytes_of(m, r->npages);
        if (r->state != SC_LIVE || __atomic_load_n(&r->atime, __ATOMIC_RELAXED) >= older_than)
            continue;
        if (sc_purge_record(m, ages[k].index, why))
            purged += (int64_t)bytes;
    }
    free(ages);
    return purged;
}

/* Make room for a set of `npages` pages; then allocate them.  The page, or -1 (no room: what is
 * left is pinned or too fragmented), or -2 (out of memory). */
static int64_t sc_make_room(sc_map *m, uint64_t npages) {
    int64_t first = sc_alloc_pages(m, npages);
    uint64_t n, k, slack = m->data_pages / SC_SLACK_DIVISOR;
    sc_age *ages;
    if (first >= 0)
        return first;
    ages = sc_lru_order(m, &n);
    if (ages == NULL)
        return -2;
    /* Purge past the need by 1/64 of the cache, so that the next sets find room without sorting
     * the records again (the sort is what a set that must make room pays). */
    for (k = 0; k < n; k++) {
        if (first >= 0 && m->hdr->used_pages + slack <= m->data_pages)
            break;
        sc_record *r = m->recs + ages[k].index;
        if (r->state != SC_LIVE || r->npages == 0 || !sc_purge_record(m, ages[k].index, SC_WHY_SIZE))
            continue;
        if (first < 0 && m->hdr->used_pages + npages <= m->data_pages)
            first = sc_alloc_pages(m, npages);
    }
    free(ages);
    return first;
}

/* Set key = value.  0 done, -1 no room (pinned entries hold it), -2 out of memory, -3 the key's
 * entry is pinned, -4 no space left in /dev/shm. */
static int sc_set(sc_map *m, uint64_t hash, uint32_t kind, const unsigned char *key,
                  size_t keylen, const unsigned char *value, size_t vallen, uint64_t checksum) {
    sc_header *h = m->hdr;
    int64_t at, empty, first;
    int inline_key = keylen <= SC_INLINE_KEY;
    uint64_t need = vallen + (inline_key ? 0 : keylen);
    uint64_t npages = (need + m->page - 1) / m->page;
    uint64_t old_first = 0, old_npages = 0;
    sc_record *r;

    int pin_locked = 0;
    uint64_t pin_page = 0;
    at = sc_w_find(m, hash, kind, key, keylen, &empty);
    if (at >= 0 && m->recs[at].state == SC_LIVE && sc_pinned(m, m->recs + at))
        return -3;  /* early refusal, before any work; the claim below is what counts */
    if (at < 0) {
        /* a new record: live entries up to 5/8 of the table, markers to what is left of 3/4;
         * purging for records goes 1/64 of the table past the need, as sc_make_room does */
        if (!sc_records_room(m, 1) &&
            sc_purge_lru(m, sc_records_room, 1 + (m->mask + 1) / SC_SLACK_DIVISOR, UINT64_MAX,
                         SC_WHY_SIZE) < 0)
            return -2;
        if (h->live + h->markers + 1 > (m->mask + 1) / 4 * 3 && h->markers) {
            sc_drop_markers(m);
        }
        if (h->live + h->markers + 1 > (m->mask + 1) / 4 * 3)
            return -1;
        at = sc_w_find(m, hash, kind, key, keylen, &empty);  /* records may have moved */
    }
    first = sc_make_room(m, npages);  /* may turn records into markers, never moves them */
    if (first < 0)
        return (int)first;
    /* tmpfs pages allocated now: a full /dev/shm fails here, not with a SIGBUS in the copy */
    if (npages && fallocate(m->fd, FALLOC_FL_KEEP_SIZE, (off_t)(h->data_off + (uint64_t)first * m->page),
                            (off_t)(npages * m->page)) != 0) {
        sc_free_pages(m, (uint64_t)first, npages);
        return -4;
    }
    /* the pages are ours alone until the record below points at them */
    memcpy(m->data + (uint64_t)first * m->page, value, vallen);
    if (!inline_key)
        memcpy(m->data + (uint64_t)first * m->page + vallen, key, keylen);
    if (at < 0)
        at = empty;
    r = m->recs + at;
    if (r->state == SC_LIVE) {
        pin_page = r->first_page;
        if (!sc_claim(m, r, &pin_locked)) {
            sc_free_pages(m, (uint64_t)first, npages);
            return -3;
        }
    } else {
        sc_write_begin(r);
    }
    if (r->state == SC_LIVE) {
        old_first = r->first_page;
        old_npages = r->npages;
        h->live -= 1;
    } else if (r->state == SC_PURGED) {
        h->markers -= 1;
    }
    r->hash = hash;
    r->flags = kind | (inline_key ? SC_FLAG_KEY_INLINE : 0);
    r->first_page = (uint64_t)first;
    r->npages = (uint32_t)npages;
    r->keylen = (uint32_t)keylen;
    r->vallen = vallen;
    r->checksum = checksum;
    if (inline_key)
        memcpy(r->key, key, keylen);
    __atomic_store_n(&r->atime, sc_now_ns(), __ATOMIC_RELAXED);
    r->state = SC_LIVE;
    h->live += 1;
    h->sets += 1;
    sc_release(m, r, pin_page, pin_locked);
    if (old_npages)
        sc_free_pages(m, old_first, old_npages);
    return 0;
}

/* Punch every run of free pages: what a set that died before publishing its record left, and
 * the zero pages readers racing a purge faulted back into freed ranges (tmpfs allocates a page on
 * a read fault of a hole). */
static void sc_punch_free(sc_map *m) {
    uint64_t p, run;
    for (p = 0; p < m->data_pages; p += run) {
        if (sc_page_used(m, p)) {
            run = 1;
            continue;
        }
        for (run = 1; p + run < m->data_pages && !sc_page_used(m, p + run); run++)
            ;
        sc_punch(m, p, run);
    }
}

/* ---- repair after a writer died ---- */

/* Rebuild the index from its own records: drop any record a writer was changing (odd sequence)
 * or that makes no sense, the second copy a shift left behind, and any record whose pages
 * overlap an earlier one's; re-insert the rest; rebuild the page bitmap and the counts; punch
 * every page no entry owns (a set that died before publishing its record).  -1: out of memory. */
static int sc_repair(sc_map *m) {
    sc_header *h = m->hdr;
    uint64_t cap = m->mask + 1, i, n = 0, k, live = 0, markers = 0, used = 0, p;
    sc_record *keep = malloc(cap * sizeof(sc_record));
    if (keep == NULL)
        return -1;
    sc_move_begin(h);
    memset(m->bitmap, 0, (m->data_pages + 63) / 64 * 8);
    for (i = 0; i < cap; i++) {
        sc_record *r = m->recs + i;
        /* markers are dropped: a reader then sees a miss where it would have seen a purge */
        int ok = !(r->seq & 1) && r->state == SC_LIVE &&
                 sc_sane(m, r->first_page, r->npages, r->vallen, r->keylen, r->flags);
        for (p = r->first_page; ok && p < r->first_page + r->npages; p++)
            if (sc_page_used(m, p))
                ok = 0;  /* a copy left by a shift, or pages claimed twice */
        if (ok) {
            sc_mark_pages(m, r->first_page, r->npages, 1);
            keep[n++] = *r;
        }
    }
    for (i = 0; i < cap; i++) {
        sc_record *r = m->recs + i;
        if (r->seq & 1)
            r->seq += 1;  /* even again: the record is rewritten below */
        if (r->state != SC_EMPTY) {
            sc_write_begin(r);
            r->state = SC_EMPTY;
            sc_write_end(r);
        }
    }
    for (k = 0; k < n; k++) {
        sc_record *src = keep + k;
        for (i = src->hash & m->mask; m->recs[i].state != SC_EMPTY; i = (i + 1) & m->mask)
            ;
        sc_record *r = m->recs + i;
        sc_write_begin(r);
        memcpy((char *)r + 8, (char *)src + 8, sizeof(sc_record) - 8);
        sc_write_end(r);
        live++;
        used += src->npages;
    }
    free(keep);
    sc_punch_free(m);
    h->live = live;
    h->markers = markers;
    h->used_pages = used;
    h->alloc_hint = 0;
    h->recoveries += 1;
    sc_move_end(h);
    return 0;
}

#endif
