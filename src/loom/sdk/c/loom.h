/* loom.h: the C ABI of Loom inferlets (usable from C, C++ and Zig via @cImport).
 *
 * A native inferlet is a WebAssembly core module that exports `memory` and
 *     int32_t run(void);        // 0: success; anything else fails the instance
 * and imports only the functions below (module "loom"). Build it freestanding:
 *     loom build app.c          // or: python -m ziglang cc --target=wasm32-freestanding
 *                               //     -nostdlib -O2 -Wl,--no-entry app.c -o app.wasm
 * Buffers are (pointer, length) pairs in the inferlet's own memory; the host checks
 * them. Handles (model, queue, future) are small integers; `loom_drop` releases one
 * early, and everything is released when `run` returns.
 */
#ifndef LOOM_H
#define LOOM_H

#include <stdint.h>

#define LOOM_IMPORT(name) __attribute__((import_module("loom"), import_name(#name)))
#define LOOM_EXPORT(name) __attribute__((export_name(#name)))

/* Arguments and messages. */
LOOM_IMPORT(arg_count) int32_t loom_arg_count(void);
/* Copies argument i (UTF-8, not NUL-terminated) into buf; returns its full length. */
LOOM_IMPORT(arg) int32_t loom_arg(int32_t i, char *buf, int32_t cap);
LOOM_IMPORT(send) void loom_send(const char *msg, int32_t len);       /* to the client */
LOOM_IMPORT(fail) void loom_fail(const char *msg, int32_t len);       /* error of `run` */

/* The model and its tokenizer. encode/decode return the full count/length, writing at
 * most cap items. */
LOOM_IMPORT(model) int32_t loom_model(void);
LOOM_IMPORT(encode) int32_t loom_encode(int32_t model, const char *text, int32_t len,
                                        uint32_t *out, int32_t cap);
LOOM_IMPORT(decode) int32_t loom_decode(int32_t model, const uint32_t *tokens, int32_t n,
                                        char *out, int32_t cap);
LOOM_IMPORT(eos) int32_t loom_eos(int32_t model);                     /* -1: none */

/* Queues and KV pages (ids are valid at once; memory is bound in queue order). */
LOOM_IMPORT(queue) int32_t loom_queue(int32_t model);
LOOM_IMPORT(page_size) int32_t loom_page_size(int32_t queue);
LOOM_IMPORT(allocate) int32_t loom_allocate(int32_t queue, int32_t n, uint32_t *pages_out);
LOOM_IMPORT(free) void loom_free(int32_t queue, const uint32_t *pages, int32_t n);

/* One forward pass: n tokens at positions pos0.., over `pages` whose last page holds
 * `last_page_len` slots after the pass. Returns a future at once. */
LOOM_IMPORT(forward) int32_t loom_forward(int32_t queue, const uint32_t *tokens, int32_t n,
                                          int32_t pos0, const uint32_t *pages, int32_t npages,
                                          int32_t last_page_len, float temperature,
                                          int32_t top_k, float top_p);
LOOM_IMPORT(forward_dist) int32_t loom_forward_dist(int32_t queue, const uint32_t *tokens,
                                                    int32_t n, int32_t pos0,
                                                    const uint32_t *pages, int32_t npages,
                                                    int32_t last_page_len, int32_t k);
/* Suspends until the pass is done: the sampled token (0 for a distribution pass), or -1
 * when the pass failed. */
LOOM_IMPORT(wait) int32_t loom_wait(int32_t future);
/* A pipelined decode step (the WIT's step-chain): runs the pass over n tokens at pos0..
 * (pages[0..npages), last_page_len slots in the last) and, before sleeping, queues the
 * next step's pass ahead of the caller: one input, the token this pass samples, at the
 * next position over pages[0..next_npages) (next_last_page_len slots in the last). The
 * engine runs it while the caller handles the token. With n == 0 the pass waited for is
 * the queue's pass ahead (queued by the last call). Returns the sampled token, or -2
 * when the pass failed. Settle a pass ahead before any other pass on the queue. */
LOOM_IMPORT(step_chain) int32_t loom_step_chain(int32_t queue, const uint32_t *tokens,
                                                int32_t n, int32_t pos0,
                                                const uint32_t *pages, int32_t npages,
                                                int32_t last_page_len, int32_t next_npages,
                                                int32_t next_last_page_len,
                                                float temperature, int32_t top_k,
                                                float top_p);
/* Drops the queue's pass ahead if it has not reached the engine (-1), else waits for it:
 * its token (its input is then in the KV cache), or -2 when it failed. */
LOOM_IMPORT(step_settle) int32_t loom_step_settle(int32_t queue);
/* After loom_wait on a distribution pass: the top-k ids and probabilities. */
LOOM_IMPORT(dist) int32_t loom_dist(int32_t future, uint32_t *ids, float *probs, int32_t cap);
LOOM_IMPORT(drop) void loom_drop(int32_t handle);

/* Small helpers: a freestanding module has no libc. */
static inline int32_t loom_strlen(const char *s) {
    int32_t n = 0;
    while (s[n]) n++;
    return n;
}

#endif
