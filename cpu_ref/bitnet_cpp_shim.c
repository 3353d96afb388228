// A few plain C entry points over bitnet.cpp's libllama (microsoft/BitNet's llama.cpp fork, the runtime of I2_S
// GGUFs), for ctypes: llama.h passes its parameter structs by value, and their layout changes between llama.cpp
// versions, so they are filled here, compiled against the checkout's own llama.h, not mirrored in Python.
// Built on demand by cpu_ref/gguf_check.py (BitnetCpp) against a built checkout: gcc -shared ... -lllama.
#include <stdlib.h>
#include <string.h>

#include "llama.h"

typedef struct {
    struct llama_model* model;
    struct llama_context* ctx;
    int n_past;
} bk_handle;

void* bk_open(const char* path, int n_ctx, int n_threads) {
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model* model = llama_load_model_from_file(path, mp);
    if (!model) return NULL;
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)n_ctx;
    cp.n_batch = (uint32_t)n_ctx;  // one decode call takes a whole sequence
    cp.n_ubatch = (uint32_t)n_ctx;
    if (n_threads > 0) {
        cp.n_threads = n_threads;
        cp.n_threads_batch = n_threads;
    }
    struct llama_context* ctx = llama_new_context_with_model(model, cp);
    if (!ctx) {
        llama_free_model(model);
        return NULL;
    }
    bk_handle* h = (bk_handle*)calloc(1, sizeof(bk_handle));
    h->model = model;
    h->ctx = ctx;
    return h;
}

int bk_n_vocab(void* hp) { return llama_n_vocab(((bk_handle*)hp)->model); }

void bk_reset(void* hp) {
    bk_handle* h = (bk_handle*)hp;
    llama_kv_cache_clear(h->ctx);
    h->n_past = 0;
}

// Appends n tokens after what was evaluated since the last reset; writes each one's next-token logits
// [n, n_vocab] to out. Returns 0, or llama_decode's nonzero status.
int bk_eval(void* hp, const int32_t* tokens, int n, float* out) {
    bk_handle* h = (bk_handle*)hp;
    struct llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        batch.token[i] = tokens[i];
        batch.pos[i] = h->n_past + i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n;
    int rc = llama_decode(h->ctx, batch);
    if (rc == 0) {
        const int nv = llama_n_vocab(h->model);
        for (int i = 0; i < n; i++) memcpy(out + (size_t)i * nv, llama_get_logits_ith(h->ctx, i), nv * sizeof(float));
        h->n_past += n;
    }
    llama_batch_free(batch);
    return rc;
}

// llama.cpp's own tokenization of text; returns the count, negative if max is short.
int bk_tokenize(void* hp, const char* text, int add_special, int parse_special, int32_t* out, int max) {
    bk_handle* h = (bk_handle*)hp;
    return llama_tokenize(h->model, text, (int32_t)strlen(text), out, max, add_special != 0, parse_special != 0);
}

void bk_close(void* hp) {
    bk_handle* h = (bk_handle*)hp;
    llama_free(h->ctx);
    llama_free_model(h->model);
    free(h);
}
