//! Greedy completion in Zig, one forward pass per token: args = prompt, max_tokens.
//! The same C ABI as loom.h, declared as Zig externs of module "loom".
//!
//!     loom build inferlets/zig_greedy/app.zig

extern "loom" fn arg_count() i32;
extern "loom" fn arg(i: i32, buf: [*]u8, cap: i32) i32;
extern "loom" fn send(msg: [*]const u8, len: i32) void;
extern "loom" fn fail(msg: [*]const u8, len: i32) void;
extern "loom" fn model() i32;
extern "loom" fn encode(m: i32, text: [*]const u8, len: i32, out: [*]u32, cap: i32) i32;
extern "loom" fn decode(m: i32, toks: [*]const u32, n: i32, out: [*]u8, cap: i32) i32;
extern "loom" fn queue(m: i32) i32;
extern "loom" fn page_size(q: i32) i32;
extern "loom" fn allocate(q: i32, n: i32, out: [*]u32) i32;
extern "loom" fn forward(q: i32, toks: [*]const u32, n: i32, pos0: i32, pages: [*]const u32, npages: i32, last: i32, temperature: f32, top_k: i32, top_p: f32) i32;
extern "loom" fn wait(fut: i32) i32;
extern "loom" fn drop(handle: i32) void;

var tokens: [4096]u32 = undefined;
var pages: [512]u32 = undefined;
var text: [16384]u8 = undefined;

fn failWith(msg: []const u8) i32 {
    fail(msg.ptr, @intCast(msg.len));
    return 1;
}

export fn run() i32 {
    if (arg_count() < 2) return failWith("usage: prompt max_tokens");
    const len = arg(0, &text, text.len);
    if (len > text.len) return failWith("prompt too long");
    var num: [16]u8 = undefined;
    const num_len: usize = @intCast(arg(1, &num, num.len));
    var max_new: i32 = 0;
    for (num[0..@min(num_len, num.len)]) |c| max_new = max_new * 10 + (c - '0');

    const m = model();
    const q = queue(m);
    const ps = page_size(q);
    const n = encode(m, &text, len, &tokens, tokens.len);
    if (n < 1 or n + max_new > tokens.len) return failWith("prompt empty or too long");
    const npages = @divTrunc(n + max_new + ps - 1, ps);
    if (npages > pages.len) return failWith("too many pages");
    _ = allocate(q, npages, &pages);

    var written: i32 = 0;
    var pending: i32 = n;
    var step: i32 = 0;
    while (step < max_new) : (step += 1) {
        const total = written + pending;
        const w: usize = @intCast(written);
        const fut = forward(q, tokens[w..].ptr, pending, written, &pages, @divTrunc(total + ps - 1, ps), @mod(total - 1, ps) + 1, 0.0, 0, 1.0);
        const next = wait(fut);
        drop(fut);
        if (next < 0) return failWith("forward pass failed");
        written = total;
        tokens[@intCast(written)] = @intCast(next);
        pending = 1;
    }
    const start: usize = @intCast(n);
    const out = decode(m, tokens[start..].ptr, max_new, &text, text.len);
    send(&text, @min(out, @as(i32, text.len)));
    return 0;
}
