
/*
 * Shared zones of per-tenant records, as limit_req keeps its nodes: one
 * rbtree keyed by the tenant's name (crc32, then the bytes) and a queue
 * in least recently used order, in a slab pool that survives
 * "nginx -s reload" (same name and size).  The limits and the metrics
 * zones are both of this kind; each gives the size of its record and
 * says which records may go when the zone is full.
 *
 * A node, in one slab allocation:
 *
 *   ngx_rbtree_node_t up to color | ngx_http_llm_zone_node_t (color, len,
 *   queue) | name [len] | padding | value [value_size]
 *
 * Every function but ngx_http_llm_zone_add() and the zone's init is
 * called with the pool's mutex held.
 */


#include "ngx_http_llm_module.h"


typedef struct {
    u_char                         color;
    u_char                         len;
    u_short                        dummy;
    ngx_queue_t                    queue;       /* LRU, most recent first */
    u_char                         data[1];     /* name, then the value */
} ngx_http_llm_zone_node_t;


#define ngx_http_llm_zone_value_of(zn)                                        \
    ((void *) ngx_align_ptr((zn)->data + (zn)->len, NGX_ALIGNMENT))


static ngx_int_t ngx_http_llm_zone_init(ngx_shm_zone_t *shm_zone,
    void *data);
static void ngx_http_llm_zone_free(ngx_http_llm_zone_t *z,
    ngx_http_llm_zone_node_t *zn);
static void ngx_http_llm_zone_rbtree_insert_value(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel);


/*
 * A zone "name" of size bytes whose records hold value_size bytes;
 * expire() (may be NULL: a full zone then drops the least recently used
 * record) says which may go.
 */

ngx_shm_zone_t *
ngx_http_llm_zone_add(ngx_conf_t *cf, char *name, size_t size,
    size_t value_size, ngx_http_llm_zone_init_pt init,
    ngx_http_llm_zone_expire_pt expire)
{
    ngx_str_t             s;
    ngx_shm_zone_t       *shm_zone;
    ngx_http_llm_zone_t  *z;

    z = ngx_pcalloc(cf->pool, sizeof(ngx_http_llm_zone_t));
    if (z == NULL) {
        return NULL;
    }

    z->value_size = value_size;
    z->init = init;
    z->expire = expire;

    s.data = (u_char *) name;
    s.len = ngx_strlen(name);

    shm_zone = ngx_shared_memory_add(cf, &s, size, &ngx_http_llm_module);
    if (shm_zone == NULL) {
        return NULL;
    }

    if (shm_zone->data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "duplicate zone \"%V\"", &s);
        return NULL;
    }

    shm_zone->init = ngx_http_llm_zone_init;
    shm_zone->data = z;

    return shm_zone;
}


static ngx_int_t
ngx_http_llm_zone_init(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_llm_zone_t  *oz = data;

    size_t                len;
    ngx_http_llm_zone_t  *z;

    z = shm_zone->data;

    if (oz) {
        /* a reload: the records go on */
        z->sh = oz->sh;
        z->shpool = oz->shpool;
        return NGX_OK;
    }

    z->shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        z->sh = z->shpool->data;
        return NGX_OK;
    }

    z->sh = ngx_slab_alloc(z->shpool, sizeof(ngx_http_llm_zone_sh_t));
    if (z->sh == NULL) {
        return NGX_ERROR;
    }

    z->shpool->data = z->sh;

    ngx_rbtree_init(&z->sh->rbtree, &z->sh->sentinel,
                    ngx_http_llm_zone_rbtree_insert_value);
    ngx_queue_init(&z->sh->queue);

    len = sizeof(" in zone \"\"") + shm_zone->shm.name.len;

    z->shpool->log_ctx = ngx_slab_alloc(z->shpool, len);
    if (z->shpool->log_ctx == NULL) {
        return NGX_ERROR;
    }

    ngx_sprintf(z->shpool->log_ctx, " in zone \"%V\"%Z",
                &shm_zone->shm.name);

    z->shpool->log_nomem = 0;

    return NGX_OK;
}


/*
 * The record of name, moved to the front of the LRU; with create, a new
 * one (zeroed, then init()) if there is none: first up to two idle
 * records of the LRU end go, and if the pool is still full, records the
 * zone lets go (forced) one by one until the new one fits.  NULL: none,
 * or the zone is full.
 */

void *
ngx_http_llm_zone_lookup(ngx_http_llm_zone_t *z, ngx_str_t *name,
    ngx_uint_t create)
{
    size_t                     size;
    uint32_t                   hash;
    ngx_int_t                  rc;
    ngx_queue_t               *q;
    ngx_rbtree_node_t         *node, *sentinel;
    ngx_http_llm_zone_node_t  *zn;

    if (name->len == 0 || name->len > 255) {
        return NULL;
    }

    hash = ngx_crc32_short(name->data, name->len);

    node = z->sh->rbtree.root;
    sentinel = z->sh->rbtree.sentinel;

    while (node != sentinel) {

        if (hash < node->key) {
            node = node->left;
            continue;
        }

        if (hash > node->key) {
            node = node->right;
            continue;
        }

        /* hash == node->key */

        zn = (ngx_http_llm_zone_node_t *) &node->color;

        rc = ngx_memn2cmp(name->data, zn->data, name->len,
                          (size_t) zn->len);

        if (rc == 0) {
            ngx_queue_remove(&zn->queue);
            ngx_queue_insert_head(&z->sh->queue, &zn->queue);
            return ngx_http_llm_zone_value_of(zn);
        }

        node = (rc < 0) ? node->left : node->right;
    }

    if (!create) {
        return NULL;
    }

    ngx_http_llm_zone_expire(z, 0);

    size = offsetof(ngx_rbtree_node_t, color)
           + offsetof(ngx_http_llm_zone_node_t, data)
           + name->len + NGX_ALIGNMENT + z->value_size;

    node = ngx_slab_alloc_locked(z->shpool, size);

    while (node == NULL) {

        /* full: the least recently used record that may go, goes */

        for (q = ngx_queue_last(&z->sh->queue);
             q != ngx_queue_sentinel(&z->sh->queue);
             q = ngx_queue_prev(q))
        {
            zn = ngx_queue_data(q, ngx_http_llm_zone_node_t, queue);

            if (z->expire == NULL
                || z->expire(z, ngx_http_llm_zone_value_of(zn), 1)
                   == NGX_OK)
            {
                break;
            }
        }

        if (q == ngx_queue_sentinel(&z->sh->queue)) {
            return NULL;
        }

        ngx_http_llm_zone_free(z, zn);

        node = ngx_slab_alloc_locked(z->shpool, size);
    }

    node->key = hash;

    zn = (ngx_http_llm_zone_node_t *) &node->color;

    zn->len = (u_char) name->len;
    ngx_memcpy(zn->data, name->data, name->len);
    ngx_memzero(ngx_http_llm_zone_value_of(zn), z->value_size);

    if (z->init) {
        z->init(ngx_http_llm_zone_value_of(zn));
    }

    ngx_rbtree_insert(&z->sh->rbtree, node);
    ngx_queue_insert_head(&z->sh->queue, &zn->queue);

    return ngx_http_llm_zone_value_of(zn);
}


/*
 * Frees idle records from the LRU end, as expire() says: NGX_OK frees,
 * NGX_DECLINED skips (in use), NGX_DONE stops (the rest is more recent
 * and still counts).  force: up to 16, else 2.
 */

void
ngx_http_llm_zone_expire(ngx_http_llm_zone_t *z, ngx_uint_t force)
{
    ngx_int_t                  rc;
    ngx_uint_t                 n;
    ngx_queue_t               *q, *prev;
    ngx_http_llm_zone_node_t  *zn;

    if (z->expire == NULL) {
        return;
    }

    q = ngx_queue_last(&z->sh->queue);

    for (n = 0; n < (force ? 16 : 2)
                && q != ngx_queue_sentinel(&z->sh->queue);
         q = prev)
    {
        prev = ngx_queue_prev(q);
        zn = ngx_queue_data(q, ngx_http_llm_zone_node_t, queue);

        rc = z->expire(z, ngx_http_llm_zone_value_of(zn), force);

        if (rc == NGX_DONE) {
            return;
        }

        if (rc != NGX_OK) {
            continue;
        }

        ngx_http_llm_zone_free(z, zn);
        n++;
    }
}


static void
ngx_http_llm_zone_free(ngx_http_llm_zone_t *z, ngx_http_llm_zone_node_t *zn)
{
    ngx_rbtree_node_t  *node;

    ngx_queue_remove(&zn->queue);

    node = (ngx_rbtree_node_t *)
               ((u_char *) zn - offsetof(ngx_rbtree_node_t, color));

    ngx_rbtree_delete(&z->sh->rbtree, node);
    ngx_slab_free_locked(z->shpool, node);
}


/*
 * Walks the records, most recently used first: the value of the one
 * after q (NULL: the first), its link in *q and its name in *name; NULL
 * at the end.
 */

void *
ngx_http_llm_zone_next(ngx_http_llm_zone_t *z, ngx_queue_t **q,
    ngx_str_t *name)
{
    ngx_queue_t               *next;
    ngx_http_llm_zone_node_t  *zn;

    next = (*q == NULL) ? ngx_queue_head(&z->sh->queue) : ngx_queue_next(*q);

    if (next == ngx_queue_sentinel(&z->sh->queue)) {
        return NULL;
    }

    *q = next;

    zn = ngx_queue_data(next, ngx_http_llm_zone_node_t, queue);

    name->data = zn->data;
    name->len = zn->len;

    return ngx_http_llm_zone_value_of(zn);
}


static void
ngx_http_llm_zone_rbtree_insert_value(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel)
{
    ngx_rbtree_node_t         **p;
    ngx_http_llm_zone_node_t   *zn, *znt;

    for ( ;; ) {

        if (node->key < temp->key) {
            p = &temp->left;

        } else if (node->key > temp->key) {
            p = &temp->right;

        } else { /* node->key == temp->key */

            zn = (ngx_http_llm_zone_node_t *) &node->color;
            znt = (ngx_http_llm_zone_node_t *) &temp->color;

            p = (ngx_memn2cmp(zn->data, znt->data, zn->len, znt->len) < 0)
                ? &temp->left : &temp->right;
        }

        if (*p == sentinel) {
            break;
        }

        temp = *p;
    }

    *p = node;
    node->parent = temp;
    node->left = sentinel;
    node->right = sentinel;
    ngx_rbt_red(node);
}
