/*
 * The adapter registry (see registry.h).
 *
 * Names live in a sorted array of entries; each entry points at its
 * current record (one version of the adapter: a folder, its check info
 * and, once loaded, its weights).  Records replaced by a reload or
 * orphaned by unregister while pinned are "retired": no entry points at
 * them and they are freed by their last release.  Every loaded record,
 * current or retired, is on one LRU list, most recently used first;
 * eviction walks it from the tail and skips pinned records.
 */
#include "registry.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

typedef struct lora_entry lora_entry;
typedef struct lora_rec   lora_rec;

struct lora_rec {
    lora_entry     *entry;      /* NULL once retired */
    char           *dir;
    llm_lora_info   info;       /* from llm_lora_check at registration */
    llm_lora       *lora;       /* NULL: not in host memory */
    uint64_t        serial;
    int             pins;
    lora_rec       *prev, *next;    /* LRU list while loaded */
};

struct lora_entry {
    char           *name;
    lora_rec       *cur;
};

struct llm_lora_registry {
    llm_model_config    cfg;
    size_t              budget;         /* 0: unlimited */
    lora_entry        **ents;           /* sorted by name */
    int                 n_ents;
    int                 cap_ents;
    lora_rec           *lru_head;       /* most recently used */
    lora_rec           *lru_tail;
    int                 n_loaded;
    size_t              bytes;
    uint64_t            serial;
    uint64_t            hits, loads, evictions;
};


/* ---------------------------------------------------------------------- */
/* Records and the LRU list                                                 */
/* ---------------------------------------------------------------------- */

static void
lru_unlink(llm_lora_registry *reg, lora_rec *r)
{
    if (r->prev != NULL) {
        r->prev->next = r->next;
    } else {
        reg->lru_head = r->next;
    }
    if (r->next != NULL) {
        r->next->prev = r->prev;
    } else {
        reg->lru_tail = r->prev;
    }
    r->prev = r->next = NULL;
}


static void
lru_push_front(llm_lora_registry *reg, lora_rec *r)
{
    r->prev = NULL;
    r->next = reg->lru_head;
    if (reg->lru_head != NULL) {
        reg->lru_head->prev = r;
    } else {
        reg->lru_tail = r;
    }
    reg->lru_head = r;
}


static void
lru_touch(llm_lora_registry *reg, lora_rec *r)
{
    if (reg->lru_head != r) {
        lru_unlink(reg, r);
        lru_push_front(reg, r);
    }
}


/* Drops the weights of a loaded record. */
static void
rec_unload(llm_lora_registry *reg, lora_rec *r)
{
    if (r->lora == NULL) {
        return;
    }
    lru_unlink(reg, r);
    reg->bytes -= r->lora->bytes;
    reg->n_loaded--;
    llm_lora_free(r->lora);
    r->lora = NULL;
}


static void
rec_free(llm_lora_registry *reg, lora_rec *r)
{
    if (r == NULL) {
        return;
    }
    rec_unload(reg, r);
    llm_free(r->dir);
    llm_free(r);
}


/* Retires the current record of an entry going away or being replaced:
 * freed now if nobody pins it, else by its last release. */
static void
rec_retire(llm_lora_registry *reg, lora_rec *r)
{
    r->entry = NULL;
    if (r->pins == 0) {
        rec_free(reg, r);
    }
}


static lora_rec *
rec_new(const char *dir, const llm_lora_info *info)
{
    lora_rec *r = llm_calloc(1, sizeof(lora_rec));

    if (r == NULL) {
        return NULL;
    }
    if ((r->dir = llm_strdup(dir)) == NULL) {
        llm_free(r);
        return NULL;
    }
    r->info = *info;
    return r;
}


/* Evicts unpinned records, least recently used first, until need more
 * bytes fit the budget or nothing more can go. */
static void
evict(llm_lora_registry *reg, size_t need)
{
    lora_rec *r, *prev;

    if (reg->budget == 0) {
        return;
    }
    for (r = reg->lru_tail; r != NULL && reg->bytes + need > reg->budget;
         r = prev)
    {
        prev = r->prev;
        if (r->pins > 0) {
            continue;
        }
        rec_unload(reg, r);
        reg->evictions++;
    }
}


static size_t
pinned_bytes(const llm_lora_registry *reg)
{
    const lora_rec *r;
    size_t          n = 0;

    for (r = reg->lru_head; r != NULL; r = r->next) {
        n += r->pins > 0 ? r->lora->bytes : 0;
    }
    return n;
}


/* ---------------------------------------------------------------------- */
/* Names                                                                    */
/* ---------------------------------------------------------------------- */

static int
valid_name(const char *s)
{
    size_t i, n = strlen(s);

    if (n == 0 || n >= LLM_LORA_NAME_MAX || s[0] == '.') {
        return 0;
    }
    for (i = 0; i < n; i++) {
        char c = s[i];

        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
              || (c >= '0' && c <= '9') || strchr("._:@+-", c) != NULL))
        {
            return 0;
        }
    }
    return 1;
}


/* Index of name, or -(insertion point) - 1. */
static int
ent_find(const llm_lora_registry *reg, const char *name)
{
    int lo = 0, hi = reg->n_ents - 1;

    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(reg->ents[mid]->name, name);

        if (c == 0) {
            return mid;
        }
        if (c < 0) {
            lo = mid + 1;
        } else {
            hi = mid - 1;
        }
    }
    return -lo - 1;
}


static lora_entry *
ent_get(const llm_lora_registry *reg, const char *name)
{
    int i;

    if (name == NULL) {
        return NULL;
    }
    i = ent_find(reg, name);
    return i >= 0 ? reg->ents[i] : NULL;
}


/* ---------------------------------------------------------------------- */
/* API                                                                      */
/* ---------------------------------------------------------------------- */

llm_lora_registry *
llm_lora_registry_new(const llm_model_config *cfg, size_t host_budget,
                      llm_err *err)
{
    llm_lora_registry *reg;

    if (cfg == NULL) {
        llm_err_set(err, LLM_EINVAL, "lora registry: no model "
                    "configuration");
        return NULL;
    }
    reg = llm_calloc(1, sizeof(llm_lora_registry));
    if (reg == NULL) {
        llm_err_set(err, LLM_ENOMEM, "lora registry: out of memory");
        return NULL;
    }
    reg->cfg = *cfg;
    reg->cfg.rope.freq_factors = NULL;  /* not ours; adapters ignore it */
    reg->budget = host_budget;
    return reg;
}


void
llm_lora_registry_free(llm_lora_registry *reg)
{
    int i;

    if (reg == NULL) {
        return;
    }
    for (i = 0; i < reg->n_ents; i++) {
        rec_free(reg, reg->ents[i]->cur);
        llm_free(reg->ents[i]->name);
        llm_free(reg->ents[i]);
    }
    /* retired records still pinned */
    while (reg->lru_head != NULL) {
        rec_free(reg, reg->lru_head);
    }
    llm_free(reg->ents);
    llm_free(reg);
}


int
llm_lora_registry_register(llm_lora_registry *reg, const char *name,
                           const char *dir, llm_err *err)
{
    llm_lora_info  info;
    lora_entry    *e;
    lora_rec      *r;
    int            i, rc;

    if (reg == NULL || name == NULL || dir == NULL) {
        return llm_err_set(err, LLM_EINVAL, "lora registry: no name or "
                           "folder");
    }
    if (!valid_name(name)) {
        return llm_err_set(err, LLM_EINVAL,
                           "adapter name \"%.*s\" is invalid (1 to %d "
                           "characters of A-Z a-z 0-9 . _ : @ + -, not "
                           "starting with '.')", LLM_LORA_NAME_MAX, name,
                           LLM_LORA_NAME_MAX - 1);
    }
    i = ent_find(reg, name);
    if (i >= 0) {
        return llm_err_set(err, LLM_ESTATE,
                           "adapter \"%s\" is already registered (from "
                           "%s)", name, reg->ents[i]->cur->dir);
    }
    i = -i - 1;
    if ((rc = llm_lora_check(dir, &reg->cfg, &info, err)) != 0) {
        llm_err_wrap(err, "adapter \"%s\"", name);
        return rc;
    }

    if (reg->n_ents == reg->cap_ents) {
        int          cap = reg->cap_ents ? 2 * reg->cap_ents : 16;
        lora_entry **n = llm_realloc(reg->ents, sizeof(lora_entry *)
                                                * (size_t) cap);

        if (n == NULL) {
            return llm_err_set(err, LLM_ENOMEM, "adapter \"%s\": out of "
                               "memory", name);
        }
        reg->ents = n;
        reg->cap_ents = cap;
    }
    e = llm_calloc(1, sizeof(lora_entry));
    r = rec_new(dir, &info);
    if (e == NULL || r == NULL || (e->name = llm_strdup(name)) == NULL) {
        llm_free(e);
        rec_free(reg, r);
        return llm_err_set(err, LLM_ENOMEM, "adapter \"%s\": out of "
                           "memory", name);
    }
    e->cur = r;
    r->entry = e;
    memmove(&reg->ents[i + 1], &reg->ents[i],
            sizeof(lora_entry *) * (size_t) (reg->n_ents - i));
    reg->ents[i] = e;
    reg->n_ents++;
    return 0;
}


static int
name_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *) a, *(char *const *) b);
}


int
llm_lora_registry_register_dir(llm_lora_registry *reg, const char *root,
                               llm_lora_refused_fn on_refused, void *ud,
                               llm_err *err)
{
    DIR            *d;
    struct dirent  *de;
    struct stat     sb;
    char          **names = NULL, **nn, path[4096], cfg[4200];
    int             n = 0, cap = 0, i, count = 0, rc = 0;
    llm_err         e;

    if (reg == NULL || root == NULL) {
        return llm_err_set(err, LLM_EINVAL, "lora registry: no folder");
    }
    d = opendir(root);
    if (d == NULL) {
        return llm_err_set(err, errno == ENOENT ? LLM_ENOTFOUND : LLM_EIO,
                           "%s: %s", root, strerror(errno));
    }
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.') {
            continue;       /* ".", "..", hidden folders */
        }
        if (n == cap) {
            cap = cap ? 2 * cap : 32;
            nn = llm_realloc(names, sizeof(char *) * (size_t) cap);
            if (nn == NULL) {
                rc = LLM_ENOMEM;
                break;
            }
            names = nn;
        }
        if ((names[n] = llm_strdup(de->d_name)) == NULL) {
            rc = LLM_ENOMEM;
            break;
        }
        n++;
    }
    closedir(d);
    if (rc != 0) {
        for (i = 0; i < n; i++) {
            llm_free(names[i]);
        }
        llm_free(names);
        return llm_err_set(err, rc, "%s: out of memory", root);
    }
    if (n > 0) {
        qsort(names, (size_t) n, sizeof(char *), name_cmp);
    }

    for (i = 0; i < n; i++) {
        if ((size_t) snprintf(path, sizeof(path), "%s/%s", root, names[i])
            >= sizeof(path))
        {
            continue;
        }
        snprintf(cfg, sizeof(cfg), "%s/%s", path, LLM_LORA_CONFIG_FILE);
        if (stat(path, &sb) != 0 || !S_ISDIR(sb.st_mode)
            || stat(cfg, &sb) != 0)
        {
            continue;       /* not an adapter folder */
        }
        memset(&e, 0, sizeof(e));
        if (llm_lora_registry_register(reg, names[i], path, &e) == 0) {
            count++;
        } else if (on_refused != NULL) {
            on_refused(ud, names[i], &e);
        }
    }
    for (i = 0; i < n; i++) {
        llm_free(names[i]);
    }
    llm_free(names);
    return count;
}


int
llm_lora_registry_unregister(llm_lora_registry *reg, const char *name,
                             llm_err *err)
{
    lora_entry *e;
    int         i;

    if (reg == NULL || name == NULL || (i = ent_find(reg, name)) < 0) {
        return llm_err_set(err, LLM_ENOTFOUND,
                           "adapter \"%s\" is not registered",
                           name != NULL ? name : "(null)");
    }
    e = reg->ents[i];
    memmove(&reg->ents[i], &reg->ents[i + 1],
            sizeof(lora_entry *) * (size_t) (reg->n_ents - i - 1));
    reg->n_ents--;
    rec_retire(reg, e->cur);
    llm_free(e->name);
    llm_free(e);
    return 0;
}


int
llm_lora_registry_reload(llm_lora_registry *reg, const char *name,
                         const char *dir, llm_err *err)
{
    lora_entry    *e;
    lora_rec      *r;
    llm_lora_info  info;
    int            rc;

    e = reg != NULL ? ent_get(reg, name) : NULL;
    if (e == NULL) {
        return llm_err_set(err, LLM_ENOTFOUND,
                           "adapter \"%s\" is not registered",
                           name != NULL ? name : "(null)");
    }
    if (dir == NULL) {
        dir = e->cur->dir;
    }
    if ((rc = llm_lora_check(dir, &reg->cfg, &info, err)) != 0) {
        llm_err_wrap(err, "adapter \"%s\" (reload refused, the current "
                     "version stays)", name);
        return rc;
    }
    if ((r = rec_new(dir, &info)) == NULL) {
        return llm_err_set(err, LLM_ENOMEM, "adapter \"%s\": out of "
                           "memory", name);
    }
    rec_retire(reg, e->cur);
    e->cur = r;
    r->entry = e;
    return 0;
}


static int
no_room(llm_lora_registry *reg, const char *name, size_t need,
        llm_err *err)
{
    return llm_err_set(err, LLM_EFULL,
                       "adapter \"%s\": needs %zu bytes of host memory; "
                       "%zu of the %zu byte budget are pinned by running "
                       "sequences", name, need, pinned_bytes(reg),
                       reg->budget);
}


int
llm_lora_registry_acquire(llm_lora_registry *reg, const char *name,
                          llm_lora_handle *h, llm_err *err)
{
    lora_entry *e;
    lora_rec   *r;
    llm_lora   *lo = NULL;
    int         rc;

    if (h == NULL) {
        return llm_err_set(err, LLM_EINVAL, "lora registry: no handle");
    }
    memset(h, 0, sizeof(*h));
    e = reg != NULL ? ent_get(reg, name) : NULL;
    if (e == NULL) {
        return llm_err_set(err, LLM_ENOTFOUND,
                           "adapter \"%s\" is not registered",
                           name != NULL ? name : "(null)");
    }
    r = e->cur;

    if (r->lora != NULL) {
        reg->hits++;
    } else {
        /* make room by the size the check predicted, so that a load that
         * cannot fit is not even started */
        evict(reg, r->info.bytes);
        if (reg->budget != 0 && reg->bytes + r->info.bytes > reg->budget) {
            return no_room(reg, name, r->info.bytes, err);
        }
        if ((rc = llm_lora_load(r->dir, &reg->cfg, &lo, err)) != 0) {
            llm_err_wrap(err, "adapter \"%s\"", name);
            return rc;
        }
        /* the files may have changed since the check */
        evict(reg, lo->bytes);
        if (reg->budget != 0 && reg->bytes + lo->bytes > reg->budget) {
            rc = no_room(reg, name, lo->bytes, err);
            llm_lora_free(lo);
            return rc;
        }
        r->lora = lo;
        r->serial = ++reg->serial;
        reg->bytes += lo->bytes;
        reg->n_loaded++;
        reg->loads++;
        lru_push_front(reg, r);
    }

    r->pins++;
    lru_touch(reg, r);
    h->lora = r->lora;
    h->version = r->lora->version;
    h->serial = r->serial;
    h->priv = r;
    return 0;
}


void
llm_lora_registry_release(llm_lora_registry *reg, llm_lora_handle *h)
{
    lora_rec *r;

    if (reg == NULL || h == NULL || h->priv == NULL) {
        return;
    }
    r = h->priv;
    memset(h, 0, sizeof(*h));
    if (r->pins > 0) {
        r->pins--;
    }
    if (r->pins > 0) {
        return;
    }
    if (r->entry == NULL) {
        rec_free(reg, r);       /* an old version's last user */
        return;
    }
    lru_touch(reg, r);
    evict(reg, 0);              /* over budget while it was pinned */
}


int
llm_lora_registry_preload(llm_lora_registry *reg, const char *name,
                          llm_err *err)
{
    llm_lora_handle h;
    int             rc;

    rc = llm_lora_registry_acquire(reg, name, &h, err);
    if (rc == 0) {
        llm_lora_registry_release(reg, &h);
    }
    return rc;
}


void
llm_lora_registry_set_budget(llm_lora_registry *reg, size_t bytes)
{
    if (reg == NULL) {
        return;
    }
    reg->budget = bytes;
    evict(reg, 0);
}


void
llm_lora_registry_get_stats(const llm_lora_registry *reg,
                            llm_lora_registry_stats *st)
{
    const lora_rec *r;

    memset(st, 0, sizeof(*st));
    if (reg == NULL) {
        return;
    }
    st->registered = reg->n_ents;
    st->loaded = reg->n_loaded;
    st->bytes = reg->bytes;
    st->budget = reg->budget;
    st->hits = reg->hits;
    st->loads = reg->loads;
    st->evictions = reg->evictions;
    for (r = reg->lru_head; r != NULL; r = r->next) {
        if (r->pins > 0) {
            st->pinned++;
            st->pinned_bytes += r->lora->bytes;
        }
    }
}


const char *
llm_lora_registry_name(const llm_lora_registry *reg, int i)
{
    if (reg == NULL || i < 0 || i >= reg->n_ents) {
        return NULL;
    }
    return reg->ents[i]->name;
}


int
llm_lora_registry_find(const llm_lora_registry *reg, const char *name,
                       const char **dir, llm_lora_info *info)
{
    lora_entry *e = reg != NULL ? ent_get(reg, name) : NULL;

    if (e == NULL) {
        return 0;
    }
    if (dir != NULL) {
        *dir = e->cur->dir;
    }
    if (info != NULL) {
        *info = e->cur->info;
    }
    return 1;
}


int
llm_lora_registry_is_loaded(const llm_lora_registry *reg, const char *name)
{
    lora_entry *e = reg != NULL ? ent_get(reg, name) : NULL;

    return e != NULL && e->cur->lora != NULL;
}


int
llm_lora_registry_peek(const llm_lora_registry *reg, const char *name,
                       const llm_lora **lora, uint64_t *serial)
{
    lora_entry *e = reg != NULL ? ent_get(reg, name) : NULL;

    if (e == NULL) {
        return -1;
    }
    if (lora != NULL) {
        *lora = e->cur->lora;
    }
    if (serial != NULL) {
        *serial = e->cur->serial;
    }
    return e->cur->lora != NULL;
}


int
llm_lora_registry_adopt(llm_lora_registry *reg, const char *name,
                        const char *dir, llm_lora *lora, llm_err *err)
{
    lora_entry *e;
    lora_rec   *r;
    int         rc;

    if (reg == NULL || name == NULL || dir == NULL || lora == NULL) {
        llm_lora_free(lora);
        return llm_err_set(err, LLM_EINVAL, "lora registry: no name, "
                           "folder or weights");
    }
    rc = ent_get(reg, name) != NULL
         ? llm_lora_registry_reload(reg, name, dir, err)
         : llm_lora_registry_register(reg, name, dir, err);
    if (rc != 0) {
        llm_lora_free(lora);
        return rc;
    }
    e = ent_get(reg, name);
    r = e->cur;                 /* a new record, not loaded yet */
    evict(reg, lora->bytes);
    if (reg->budget != 0 && reg->bytes + lora->bytes > reg->budget) {
        llm_lora_free(lora);    /* no room now: loads at first use */
        return 0;
    }
    r->lora = lora;
    r->serial = ++reg->serial;
    reg->bytes += lora->bytes;
    reg->n_loaded++;
    reg->loads++;
    lru_push_front(reg, r);
    return 0;
}
