/*
 * PEFT adapters on arbitrary bytes: adapter_config.json and
 * adapter_model.safetensors (the two parts of the input; fuzz.h) checked
 * and loaded against a real base model's configuration, as the engine
 * registers and loads a tenant's fine-tune.  Adapters come from the
 * operator's customers, so a bad one must be refused with the file, the
 * tensor and the reason, and nothing else affected (issue 4).
 *
 * The base model is LLM_FUZZ_MODEL (t/fuzz/run.sh passes the tiny model
 * whose adapters seed the corpus).  Properties beyond "no crash":
 * llm_lora_load takes only what llm_lora_check (header only) takes, and
 * refuses beyond it only weights that are not finite numbers; a loaded
 * adapter has the shape check announced, and only finite weights.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "adapters/lora.h"
#include "engine/model.h"
#include "kernels/backend.h"
#include "t/fuzz/fuzz.h"

static llm_model_config cfg;


int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char  *path = getenv("LLM_FUZZ_MODEL");
    llm_model   *m;
    llm_err      err;

    if (path == NULL || path[0] == '\0') {
        fuzz_fail("LLM_FUZZ_MODEL is not set", "the base model to check "
                  "adapters against (t/fuzz/run.sh sets it)");
    }
    m = llm_model_load(path, fuzz_cpu(), NULL, NULL, &err);
    if (m == NULL) {
        fuzz_fail("cannot load the base model", err.msg);
    }
    cfg = m->cfg;
    llm_model_free(m);
    return 0;
}


static void
check_loaded(const llm_lora *lo, const llm_lora_info *info)
{
    int l, t;

    if (lo->bytes != info->bytes || lo->max_rank != info->max_rank
        || lo->n_weights != info->n_weights || lo->targets != info->targets)
    {
        fuzz_fail("llm_lora_load and llm_lora_check describe the adapter "
                  "differently", NULL);
    }
    for (l = 0; l < lo->n_layers; l++) {
        for (t = 0; t < LLM_LORA_N_TARGETS; t++) {
            const llm_lora_weight *w = llm_lora_at(lo, l, t);
            size_t                 i;

            for (i = 0; i < (size_t) w->rank * (size_t) w->in; i++) {
                if (!isfinite(w->a[i])) {
                    fuzz_fail("a loaded adapter holds a non-finite A", NULL);
                }
            }
            for (i = 0; i < (size_t) w->rank * (size_t) w->out; i++) {
                if (!isfinite(w->b[i])) {
                    fuzz_fail("a loaded adapter holds a non-finite B", NULL);
                }
            }
        }
    }
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_part     part[FUZZ_MAX_PARTS];
    char          path[512];
    llm_lora_info info;
    llm_lora     *lo = NULL;
    llm_err       err;
    int           n, checked, loaded;

    n = fuzz_split(data, size, part, 2);
    fuzz_write("adapter_config.json", part[0].data, part[0].len, path,
               sizeof(path));
    fuzz_write("adapter_model.safetensors", n > 1 ? part[1].data : NULL,
               n > 1 ? part[1].len : 0, path, sizeof(path));

    err.msg[0] = '\0';
    checked = llm_lora_check(fuzz_dir(), &cfg, &info, &err) == 0;
    if (!checked && err.msg[0] == '\0') {
        fuzz_fail("llm_lora_check", "refused without a message");
    }
    err.msg[0] = '\0';
    loaded = llm_lora_load(fuzz_dir(), &cfg, &lo, &err) == 0;
    if (!loaded && err.msg[0] == '\0') {
        fuzz_fail("llm_lora_load", "refused without a message");
    }
    if (loaded) {
        if (!checked) {
            fuzz_fail("llm_lora_load took an adapter llm_lora_check "
                      "refuses", NULL);
        }
        check_loaded(lo, &info);
        llm_lora_free(lo);
    } else if (checked && strstr(err.msg, "is not a finite number") == NULL) {
        fuzz_fail("llm_lora_load refused an adapter llm_lora_check takes",
                  err.msg);
    }
    return 0;
}
