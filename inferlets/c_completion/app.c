/* Greedy text completion in C, one forward pass per token (pipelined: each step's pass is
 * queued before the last token comes back): args = prompt, max_tokens.
 * Sends the completion text to the client.
 *
 *     loom build inferlets/c_completion/app.c
 */
#include "loom.h"

#define MAX_TOKENS 4096
#define MAX_PAGES 512

static uint32_t tokens[MAX_TOKENS];
static uint32_t pages[MAX_PAGES];
static char text[16384];

static int32_t parse_int(const char *s, int32_t n) {
    int32_t v = 0;
    for (int32_t i = 0; i < n && s[i] >= '0' && s[i] <= '9'; i++) v = v * 10 + (s[i] - '0');
    return v;
}

static int32_t fail(const char *msg) {
    loom_fail(msg, loom_strlen(msg));
    return 1;
}

LOOM_EXPORT(run) int32_t run(void) {
    if (loom_arg_count() < 2) return fail("usage: prompt max_tokens");
    int32_t len = loom_arg(0, text, sizeof text);
    if (len > (int32_t)sizeof text) return fail("prompt too long");
    char num[16];
    int32_t max_new = parse_int(num, loom_arg(1, num, sizeof num));

    int32_t model = loom_model();
    int32_t q = loom_queue(model);
    int32_t ps = loom_page_size(q);
    int32_t n = loom_encode(model, text, len, tokens, MAX_TOKENS);
    if (n < 1 || n + max_new > MAX_TOKENS) return fail("prompt empty or too long");
    int32_t npages = (n + max_new + ps) / ps; /* the last pass ahead writes one slot more */
    if (npages > MAX_PAGES) return fail("too many pages");
    loom_allocate(q, npages, pages);

    /* Prefill the prompt (sampling the first token), then one token per pass. Each call
     * also queues the next step's pass, fed the token this one samples, so the engine
     * runs it while this loop goes round; later calls wait for that pass (n = 0). */
    int32_t total = n; /* KV slots after the pass this call waits for */
    for (int32_t step = 0; step < max_new; step++) {
        int32_t ahead = total + 1;
        int32_t next = loom_step_chain(q, tokens, step == 0 ? n : 0, 0, pages,
                                       step == 0 ? (total + ps - 1) / ps : 0,
                                       (total - 1) % ps + 1, (ahead + ps - 1) / ps,
                                       (ahead - 1) % ps + 1, 0.0f, 0, 1.0f);
        if (next < 0) return fail("forward pass failed");
        tokens[total] = (uint32_t)next;
        total = ahead;
    }
    int32_t out = loom_decode(model, tokens + n, max_new, text, sizeof text);
    loom_send(text, out < (int32_t)sizeof text ? out : (int32_t)sizeof text);
    loom_free(q, pages, npages);
    return 0;
}
