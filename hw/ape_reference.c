/*
 * ape_reference: a software stand-in for StreamLIC's autoregressive (context) engine.
 *
 * It loads the four HLS parameter streams of an export directory (weights.txt, biases.txt,
 * scale_params.txt, scale_shifts.txt) the way the kernel's loader reads them (docs/export-format.md),
 * runs the row-causal context model on the integer latents of a golden set (ctx1 ->
 * LeakyReLU -> ctx2 -> + hyper row -> LeakyReLU -> ep, then symbols and dequantized
 * latents), computing only the active blocks the pointers name, and compares the symbols
 * and pdf indices with the golden ones. It is written from the design document, not from
 * the Python exporter, so a layout error on either side shows up as a failure here.
 *
 * Build: cc -std=c99 -Wall -Werror -O2 -o ape_reference ape_reference.c
 * Run:   ape_reference [--flag value ...] EXPORT_DIR GOLDEN_DIR OUT_DIR
 * Exit:  0 no mismatch, 1 mismatches, 2 bad input (one line on stderr names the file).
 */

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PROGRAM "ape_reference"
#define SYMBOL_MAX 127
#define SCALE_LEVELS 128  /* pairs of symbol bounds at the end of biases.txt */
#define LEAKY_SHIFT 6     /* LeakyReLU slope 1/64 */
#define PATH_SIZE 4096
#define TOKEN_SIZE 64

/* ------------------------------------------------------------------ errors and memory */

static void fail(const char *format, ...)
{
    va_list args;
    fprintf(stderr, PROGRAM ": error: ");
    va_start(args, format);
    vfprintf(stderr, format, args);
    va_end(args);
    fputc('\n', stderr);
    exit(2);
}

static void *checked_calloc(size_t count, size_t size, const char *what)
{
    void *memory = calloc(count == 0 ? 1 : count, size);
    if (memory == NULL)
        fail("out of memory for %s (%zu x %zu bytes)", what, count, size);
    return memory;
}

static void join_path(char *out, const char *dir, const char *name)
{
    int n = snprintf(out, PATH_SIZE, "%s/%s", dir, name);
    if (n < 0 || n >= PATH_SIZE)
        fail("path too long: %s/%s", dir, name);
}

/* ------------------------------------------------------------------ integer arithmetic */

/* floor(v / 2^k). C leaves >> of a negative signed value implementation-defined; for v < 0,
 * ~v = -v - 1 >= 0 and floor(v / 2^k) = ~(~v >> k), so only non-negative values are shifted. */
static int64_t shift_floor(int64_t v, int k)
{
    return v >= 0 ? v >> k : ~(~v >> k);
}

/* (v + 2^(r-1)) >> r: rounding shift, ties go up (docs/fixed-point.md). */
static int64_t rshift_round(int64_t v, int r)
{
    return r == 0 ? v : shift_floor(v + ((int64_t)1 << (r - 1)), r);
}

static int64_t clamp(int64_t v, int64_t lo, int64_t hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

/* LeakyReLU(1/64) on integers: negative v becomes (v + 32) >> 6. */
static int64_t leaky_relu(int64_t v)
{
    return v < 0 ? rshift_round(v, LEAKY_SHIFT) : v;
}

/* ------------------------------------------------------------------ integer text files */

/* Whitespace-separated integers, counted, with the line of the last token for messages. */
typedef struct {
    FILE *file;
    char path[PATH_SIZE];
    long count;       /* integers read so far */
    long line;        /* line of the next character */
    long token_line;  /* line of the last token */
} IntReader;

static void reader_open(IntReader *reader, const char *dir, const char *name)
{
    join_path(reader->path, dir, name);
    reader->file = fopen(reader->path, "r");
    if (reader->file == NULL)
        fail("cannot open %s: %s", reader->path, strerror(errno));
    reader->count = 0;
    reader->line = 1;
    reader->token_line = 1;
}

/* The next token into buf; 0 at the end of the file. */
static int next_token(IntReader *reader, char *buf)
{
    size_t length = 0;
    int c = getc(reader->file);
    while (c != EOF && isspace(c)) {
        if (c == '\n')
            reader->line++;
        c = getc(reader->file);
    }
    if (c == EOF) {
        if (ferror(reader->file))
            fail("cannot read %s: %s", reader->path, strerror(errno));
        return 0;
    }
    reader->token_line = reader->line;
    while (c != EOF && !isspace(c)) {
        if (length + 1 >= TOKEN_SIZE)
            fail("%s: line %ld: token too long for an integer", reader->path, reader->line);
        buf[length++] = (char)c;
        c = getc(reader->file);
    }
    buf[length] = '\0';
    if (c == '\n')
        reader->line++;
    return 1;
}

/* The next integer, which must lie in [lo, hi]; `what` says what the loader was reading. */
static int64_t read_int(IntReader *reader, int64_t lo, int64_t hi, const char *what)
{
    char token[TOKEN_SIZE];
    char *end;
    long long value;
    if (!next_token(reader, token))
        fail("%s: ends early after %ld integers, while reading %s", reader->path, reader->count, what);
    errno = 0;
    value = strtoll(token, &end, 10);
    if (end == token || *end != '\0' || errno == ERANGE)
        fail("%s: line %ld: '%s' is not an integer (%s)", reader->path, reader->token_line, token, what);
    if (value < lo || value > hi)
        fail("%s: line %ld: %lld is outside [%" PRId64 ", %" PRId64 "] (%s)", reader->path, reader->token_line,
             value, lo, hi, what);
    reader->count++;
    return (int64_t)value;
}

/* The file must end here; `hint` (may be "") is added to the message when it does not. */
static void reader_close_at_end(IntReader *reader, const char *hint)
{
    char token[TOKEN_SIZE];
    if (next_token(reader, token))
        fail("%s: extra integers after the %ld expected (line %ld: '%s')%s", reader->path, reader->count,
             reader->token_line, token, hint);
    fclose(reader->file);
}

/* A golden tensor in (H, W, C) row-major text, one pixel (C integers) per line. */
static int32_t *read_tensor(const char *dir, const char *name, long pixels, long channels, int64_t bound)
{
    IntReader reader;
    char what[128];
    int32_t *values = checked_calloc((size_t)(pixels * channels), sizeof *values, name);
    long pixel, c;
    /* a golden set of another size than the manifest's shows here: say how to give it */
    snprintf(what, sizeof what, "%ld pixels of %ld values; --height/--width give other sizes", pixels, channels);
    reader_open(&reader, dir, name);
    for (pixel = 0; pixel < pixels; pixel++) {
        for (c = 0; c < channels; c++) {
            values[pixel * channels + c] = (int32_t)read_int(&reader, -bound, bound, what);
            if (reader.token_line != pixel + 1)
                fail("%s: line %ld: expected %ld values per line (one pixel of (H, W, C) row-major)", reader.path,
                     reader.token_line, channels);
        }
    }
    reader_close_at_end(&reader, "; --height/--width give other sizes");
    return values;
}

static void write_tensor(const char *dir, const char *name, const int32_t *values, long pixels, long channels)
{
    char path[PATH_SIZE];
    FILE *file;
    long pixel, c;
    join_path(path, dir, name);
    file = fopen(path, "w");
    if (file == NULL)
        fail("cannot write %s: %s (does the output directory exist?)", path, strerror(errno));
    for (pixel = 0; pixel < pixels; pixel++)
        for (c = 0; c < channels; c++)
            fprintf(file, "%" PRId32 "%c", values[pixel * channels + c], c + 1 < channels ? ' ' : '\n');
    if (ferror(file) || fclose(file) != 0)
        fail("cannot write %s: %s", path, strerror(errno));
}

/* ------------------------------------------------------------------ manifest.json lookup */

/* Just enough JSON to walk to a value by a path of keys and array indices. */

static const char *json_skip_space(const char *p)
{
    while (*p != '\0' && isspace((unsigned char)*p))
        p++;
    return p;
}

static const char *json_skip_string(const char *p) /* p at the opening quote */
{
    for (p++; *p != '\0' && *p != '"'; p++)
        if (*p == '\\' && p[1] != '\0')
            p++;
    return *p == '"' ? p + 1 : NULL;
}

static const char *json_skip_value(const char *p)
{
    p = json_skip_space(p);
    if (*p == '"')
        return json_skip_string(p);
    if (*p == '{' || *p == '[') {
        char close = *p == '{' ? '}' : ']';
        p = json_skip_space(p + 1);
        if (*p == close)
            return p + 1;
        for (;;) {
            if (close == '}') {
                if (*p != '"' || (p = json_skip_string(p)) == NULL)
                    return NULL;
                p = json_skip_space(p);
                if (*p++ != ':')
                    return NULL;
            }
            if ((p = json_skip_value(p)) == NULL)
                return NULL;
            p = json_skip_space(p);
            if (*p == close)
                return p + 1;
            if (*p++ != ',')
                return NULL;
            p = json_skip_space(p);
        }
    }
    {
        const char *start = p; /* number, true, false, null */
        while (isalnum((unsigned char)*p) || *p == '-' || *p == '+' || *p == '.')
            p++;
        return p == start ? NULL : p;
    }
}

/* The value under `key` of the object at p, or element `key` (decimal) of the array at p. */
static const char *json_child(const char *p, const char *key)
{
    p = json_skip_space(p);
    if (*p == '[') {
        char *end;
        long index = strtol(key, &end, 10);
        if (end == key || *end != '\0' || index < 0)
            return NULL;
        p = json_skip_space(p + 1);
        for (; index > 0; index--) {
            if ((p = json_skip_value(p)) == NULL)
                return NULL;
            p = json_skip_space(p);
            if (*p++ != ',')
                return NULL;
        }
        p = json_skip_space(p);
        return *p == ']' ? NULL : p;
    }
    if (*p != '{')
        return NULL;
    p = json_skip_space(p + 1);
    while (*p == '"') {
        const char *name = p + 1;
        const char *after = json_skip_string(p);
        if (after == NULL)
            return NULL;
        p = json_skip_space(after);
        if (*p++ != ':')
            return NULL;
        p = json_skip_space(p);
        if ((size_t)(after - 1 - name) == strlen(key) && memcmp(name, key, strlen(key)) == 0)
            return p;
        if ((p = json_skip_value(p)) == NULL)
            return NULL;
        p = json_skip_space(p);
        if (*p++ != ',')
            return NULL;
        p = json_skip_space(p);
    }
    return NULL;
}

/* The integer at a '/'-separated path such as "config/model/M"; 0 when absent. */
static int json_integer(const char *json, const char *path, long *value)
{
    char key[256];
    const char *p = json;
    while (*path != '\0' && p != NULL) {
        size_t length = strcspn(path, "/");
        if (length >= sizeof key)
            return 0;
        memcpy(key, path, length);
        key[length] = '\0';
        p = json_child(p, key);
        path += length + (path[length] == '/');
    }
    if (p != NULL) {
        char *end;
        errno = 0;
        *value = strtol(p, &end, 10);
        if (end != p && errno == 0 && strchr(".eE", *end) == NULL)
            return 1;
    }
    return 0;
}

/* The whole file as a string, or NULL when it does not exist. */
static char *read_text(const char *path)
{
    FILE *file = fopen(path, "rb");
    char *text;
    size_t size = 0, capacity = 1 << 16, n;
    if (file == NULL)
        return NULL;
    text = checked_calloc(capacity, 1, path);
    while ((n = fread(text + size, 1, capacity - 1 - size, file)) > 0) {
        size += n;
        if (size + 1 == capacity) {
            capacity *= 2;
            text = realloc(text, capacity);
            if (text == NULL)
                fail("out of memory reading %s", path);
        }
    }
    if (ferror(file))
        fail("cannot read %s: %s", path, strerror(errno));
    fclose(file);
    text[size] = '\0';
    return text;
}

/* ------------------------------------------------------------------ settings */

enum {
    ACT_BITS, WEIGHT_BITS, PRECISION_BITS, MULTIPLIER_BITS, SHIFT_BITS, BLOCK_IN, BLOCK_OUT, LATENT_CHANNELS,
    CTX1_BLOCKS, CTX2_BLOCKS, EP_BLOCKS, HEIGHT, WIDTH, SETTING_COUNT
};

/* Each size comes from its command-line flag, else from the export's manifest.json. */
static const struct {
    const char *flag;
    const char *manifest_path;
} SETTINGS[SETTING_COUNT] = {
    /* the row engine's own widths (one datapath for ctx1, ctx2, the channel addition and ep) */
    {"--act-bits", "context_engine/bit_widths/activation"},
    {"--weight-bits", "context_engine/bit_widths/weight"},
    {"--precision-bits", "context_engine/bit_widths/precision"},
    {"--multiplier-bits", "bit_widths/multiplier"},
    {"--shift-bits", "bit_widths/shift"},
    {"--block-in", "config/hardware/block_in"},
    {"--block-out", "config/hardware/block_out"},
    {"--latent-channels", "config/model/M"},
    {"--ctx1-blocks", "context_layers/ctx1/blocks_per_group"},
    {"--ctx2-blocks", "context_layers/ctx2/blocks_per_group"},
    {"--ep-blocks", "context_layers/ep/blocks_per_group"},
    {"--height", "golden/files/y.txt/shape_hwc/0"}, /* latent rows of the golden set */
    {"--width", "golden/files/y.txt/shape_hwc/1"},
};

static void usage(void)
{
    int i;
    fprintf(stderr, "usage: " PROGRAM " [options] EXPORT_DIR GOLDEN_DIR OUT_DIR\n"
                    "  reads the HLS streams and manifest.json of EXPORT_DIR, y.txt and hyper.txt of GOLDEN_DIR;\n"
                    "  writes OUT_DIR/symbols.txt and OUT_DIR/pdf_index.txt (OUT_DIR must exist) and compares\n"
                    "  them with GOLDEN_DIR/symbols.txt and GOLDEN_DIR/pdf_index.txt\n"
                    "options (each overrides the manifest value in brackets):\n");
    for (i = 0; i < SETTING_COUNT; i++)
        fprintf(stderr, "  %-18s N  [%s]\n", SETTINGS[i].flag, SETTINGS[i].manifest_path);
    exit(2);
}

static void require(int condition, const char *message, long value)
{
    if (!condition)
        fail("unsupported configuration: %s (got %ld)", message, value);
}

/* ------------------------------------------------------------------ the engine's layers */

/* One block-sparse layer as the kernel holds it after loading. The input is a buffer of
 * (width + 2) padded columns of `in_buffer_channels` channels; block (group g, slot b) adds
 * weights[PO][PI] x channels [pointer * PI, pointer * PI + PI) of column x + offset to the
 * PO outputs of group g at column x. */
typedef struct {
    const char *name;
    int kernel_h, kernel_w;
    int row_channels;        /* channels of one input row (M for ctx1, 2M otherwise) */
    int in_buffer_channels;  /* kernel_h rows stacked: what a channel pointer addresses */
    int out_channels;
    int out_groups;
    int blocks_per_group;
    int index_channels;      /* ep: odd channels are pdf indices, clamped to [0, 127] */
    int32_t *weights;        /* [out_groups][blocks_per_group][PO][PI] */
    int32_t *channel_pointer; /* [out_groups][blocks_per_group] */
    int32_t *column_offset;
    int64_t *bias, *multiplier;
    int32_t *shift;
} Layer;

typedef struct {
    int act_bits, residual_bits, latent_shift, block_in, block_out;
    int64_t act_max;
} Datapath;

enum { CTX1, CTX2, EP, LAYER_COUNT };

/* weights.txt: per layer, per output group, its active blocks, each row-major [PO][PI]. */
static void load_weights(Layer *layers, const Datapath *dp, int64_t weight_max, const char *dir)
{
    IntReader reader;
    char what[128];
    int l, g, b, i;
    reader_open(&reader, dir, "weights.txt");
    for (l = 0; l < LAYER_COUNT; l++) {
        Layer *layer = &layers[l];
        size_t block_size = (size_t)dp->block_out * dp->block_in;
        for (g = 0; g < layer->out_groups; g++)
            for (b = 0; b < layer->blocks_per_group; b++) {
                int32_t *block = layer->weights + ((size_t)g * layer->blocks_per_group + b) * block_size;
                snprintf(what, sizeof what, "%s output group %d block %d weights", layer->name, g, b);
                for (i = 0; i < (int)block_size; i++)
                    block[i] = (int32_t)read_int(&reader, -weight_max, weight_max, what);
            }
    }
    reader_close_at_end(&reader, "");
}

/* scale_params.txt / scale_shifts.txt: ctx1's, ctx2's, ep's output channels in order. */
static void load_scales(Layer *layers, int multiplier_bits, int shift_bits, const char *dir)
{
    IntReader params, shifts;
    char what[128];
    int l, c;
    reader_open(&params, dir, "scale_params.txt");
    reader_open(&shifts, dir, "scale_shifts.txt");
    for (l = 0; l < LAYER_COUNT; l++)
        for (c = 0; c < layers[l].out_channels; c++) {
            snprintf(what, sizeof what, "%s channel %d", layers[l].name, c);
            layers[l].multiplier[c] = read_int(&params, 1, ((int64_t)1 << multiplier_bits) - 1, what);
            layers[l].shift[c] = (int32_t)read_int(&shifts, 0, ((int64_t)1 << shift_bits) - 1, what);
        }
    reader_close_at_end(&params, "");
    reader_close_at_end(&shifts, "");
}

/* biases.txt: (1) all biases, (2) all block pointers, (3) the symbol bounds. */
static void load_biases(Layer *layers, const Datapath *dp, int precision_bits, const char *dir)
{
    IntReader reader;
    char what[128];
    int64_t bias_max = ((int64_t)1 << (precision_bits - 1)) - 1;
    int l, g, b, c, level;
    reader_open(&reader, dir, "biases.txt");
    for (l = 0; l < LAYER_COUNT; l++)
        for (c = 0; c < layers[l].out_channels; c++) {
            snprintf(what, sizeof what, "%s bias of channel %d", layers[l].name, c);
            layers[l].bias[c] = read_int(&reader, -bias_max, bias_max, what);
        }
    for (l = 0; l < LAYER_COUNT; l++) {
        Layer *layer = &layers[l];
        int row_groups = layer->row_channels / dp->block_in;
        for (g = 0; g < layer->out_groups; g++) {
            long previous_key = -1;
            for (b = 0; b < layer->blocks_per_group; b++) {
                size_t slot = (size_t)g * layer->blocks_per_group + b;
                int32_t pointer, offset;
                long key;
                snprintf(what, sizeof what, "%s output group %d block %d channel pointer", layer->name, g, b);
                pointer = (int32_t)read_int(&reader, 0, layer->in_buffer_channels / dp->block_in - 1, what);
                snprintf(what, sizeof what, "%s output group %d block %d horizontal offset", layer->name, g, b);
                offset = (int32_t)read_int(&reader, 0, layer->kernel_w - 1, what);
                /* a group lists its blocks once each, in (kh, kw, input group) order */
                key = ((long)(pointer / row_groups) * layer->kernel_w + offset) * row_groups + pointer % row_groups;
                if (key <= previous_key)
                    fail("%s: line %ld: %s output group %d block %d (pointer %d, offset %d) repeats a block or breaks "
                         "the (kh, kw, input group) order", reader.path, reader.token_line, layer->name, g, b,
                         pointer, offset);
                previous_key = key;
                layer->channel_pointer[slot] = pointer;
                layer->column_offset[slot] = offset;
            }
        }
    }
    for (level = 0; level < SCALE_LEVELS; level++) {
        snprintf(what, sizeof what, "symbol bounds of level %d (127 -127)", level);
        read_int(&reader, SYMBOL_MAX, SYMBOL_MAX, what);
        read_int(&reader, -SYMBOL_MAX, -SYMBOL_MAX, what);
    }
    reader_close_at_end(&reader, "");
}

/* One output row of a layer: only the active blocks, then the requantization of docs/fixed-point.md:
 * v = ((acc * m) >> k) + b, q = clamp(rshift_round(v, r)). */
static void run_layer(const Layer *layer, const Datapath *dp, const int32_t *in, int width, int64_t *acc,
                      int32_t *out)
{
    const int pi = dp->block_in, po = dp->block_out;
    int g, b, x, o, i, c;
    memset(acc, 0, (size_t)width * layer->out_channels * sizeof *acc);
    for (g = 0; g < layer->out_groups; g++)
        for (b = 0; b < layer->blocks_per_group; b++) {
            size_t slot = (size_t)g * layer->blocks_per_group + b;
            const int32_t *block = layer->weights + slot * po * pi;
            int first_channel = layer->channel_pointer[slot] * pi;
            for (x = 0; x < width; x++) {
                const int32_t *column = in + (size_t)(x + layer->column_offset[slot]) * layer->in_buffer_channels
                                        + first_channel;
                int64_t *sums = acc + (size_t)x * layer->out_channels + (size_t)g * po;
                for (o = 0; o < po; o++) {
                    int64_t sum = 0;
                    for (i = 0; i < pi; i++)
                        sum += (int64_t)block[o * pi + i] * column[i];
                    sums[o] += sum;
                }
            }
        }
    for (x = 0; x < width; x++)
        for (c = 0; c < layer->out_channels; c++) {
            int64_t a = acc[(size_t)x * layer->out_channels + c], m = layer->multiplier[c];
            int64_t v, lo = -dp->act_max, hi = dp->act_max;
            if (a > INT64_MAX / m || a < -(INT64_MAX / m))
                fail("%s channel %d: accumulator %" PRId64 " times multiplier %" PRId64 " overflows 64 bits",
                     layer->name, c, a, m);
            v = shift_floor(a * m, layer->shift[c]) + layer->bias[c];
            if (layer->index_channels && c % 2 == 1) {
                lo = 0;
                hi = SCALE_LEVELS - 1;
            }
            out[(size_t)x * layer->out_channels + c] = (int32_t)clamp(rshift_round(v, dp->residual_bits), lo, hi);
        }
}

/* Copy `width` pixels of `channels` into a buffer row of (width + 2) columns of
 * `stride` channels, starting at channel `at`, leaving the padding columns zero. */
static void put_padded(int32_t *buffer, int stride, int at, const int32_t *row, int width, int channels)
{
    int x;
    for (x = 0; x < width; x++)
        memcpy(buffer + (size_t)(x + 1) * stride + at, row + (size_t)x * channels, (size_t)channels * sizeof *row);
}

/* The row loop of the engine: every latent row is predicted from the three dequantized rows
 * above it (zeros above row 0), then quantized to symbols. */
static void run_engine(const Layer *layers, const Datapath *dp, int height, int width, int m, const int32_t *y,
                       const int32_t *hyper, int32_t *symbols, int32_t *pdf_index)
{
    int c2 = 2 * m, h, x, c, kh;
    int32_t *y_hat = checked_calloc((size_t)height * width * m, sizeof *y_hat, "dequantized latents");
    int32_t *ctx1_in = checked_calloc((size_t)(width + 2) * 3 * m, sizeof *ctx1_in, "ctx1 input");
    int32_t *ctx2_in = checked_calloc((size_t)(width + 2) * c2, sizeof *ctx2_in, "ctx2 input");
    int32_t *ep_in = checked_calloc((size_t)(width + 2) * c2, sizeof *ep_in, "ep input");
    int32_t *out = checked_calloc((size_t)width * c2, sizeof *out, "layer output");
    int64_t *acc = checked_calloc((size_t)width * c2, sizeof *acc, "accumulators");
    for (h = 0; h < height; h++) {
        /* ctx1 reads rows h-3, h-2, h-1 stacked as channels kh * M + c of each column */
        for (kh = 0; kh < 3; kh++) {
            int source = h - 3 + kh;
            if (source >= 0)
                put_padded(ctx1_in, 3 * m, kh * m, y_hat + (size_t)source * width * m, width, m);
        }
        run_layer(&layers[CTX1], dp, ctx1_in, width, acc, out);
        for (x = 0; x < width * c2; x++)
            out[x] = (int32_t)leaky_relu(out[x]);
        put_padded(ctx2_in, c2, 0, out, width, c2);
        run_layer(&layers[CTX2], dp, ctx2_in, width, acc, out);
        /* channel addition with the hyper output row, then LeakyReLU */
        for (x = 0; x < width * c2; x++) {
            int64_t sum = clamp((int64_t)hyper[(size_t)h * width * c2 + x] + out[x], -dp->act_max, dp->act_max);
            out[x] = (int32_t)leaky_relu(sum);
        }
        put_padded(ep_in, c2, 0, out, width, c2);
        run_layer(&layers[EP], dp, ep_in, width, acc, out);
        for (x = 0; x < width; x++)
            for (c = 0; c < m; c++) {
                size_t at = ((size_t)h * width + x) * m + c;
                int64_t mean = out[(size_t)x * c2 + 2 * c];
                int64_t symbol = clamp(rshift_round(y[at] - mean, dp->latent_shift), -SYMBOL_MAX, SYMBOL_MAX);
                symbols[at] = (int32_t)symbol;
                pdf_index[at] = out[(size_t)x * c2 + 2 * c + 1];
                /* symbol * 2^(A-8) + mean, kept in the activation range the next rows read */
                y_hat[at] = (int32_t)clamp(symbol * ((int64_t)1 << dp->latent_shift) + mean, -dp->act_max,
                                           dp->act_max);
            }
    }
    free(y_hat);
    free(ctx1_in);
    free(ctx2_in);
    free(ep_in);
    free(out);
    free(acc);
}

/* Mismatching values against the golden file, with the first one's position printed. */
static long compare(const char *name, const int32_t *ours, const int32_t *golden, int height, int width, int m)
{
    long total = (long)height * width * m, mismatches = 0, i, first = -1;
    for (i = 0; i < total; i++)
        if (ours[i] != golden[i] && mismatches++ == 0)
            first = i;
    printf("%-14s %ld of %ld values differ", name, mismatches, total);
    if (first >= 0)
        printf(" (first at row %ld, column %ld, channel %ld: %" PRId32 ", golden %" PRId32 ")", first / m / width,
               first / m % width, first % m, ours[first], golden[first]);
    printf("\n");
    return mismatches;
}

int main(int argc, char **argv)
{
    long settings[SETTING_COUNT];
    const char *dirs[3];
    int i, dir_count = 0;
    char path[PATH_SIZE];
    char *manifest;
    Datapath dp;
    Layer layers[LAYER_COUNT];
    int m, height, width, l;
    int32_t *y, *hyper, *symbols, *pdf_index, *golden_symbols, *golden_pdf_index;
    long pixels, mismatches;

    for (i = 0; i < SETTING_COUNT; i++)
        settings[i] = -1;
    for (i = 1; i < argc; i++) {
        if (strncmp(argv[i], "--", 2) == 0) {
            int s;
            char *end;
            for (s = 0; s < SETTING_COUNT && strcmp(argv[i], SETTINGS[s].flag) != 0; s++)
                ;
            if (s == SETTING_COUNT || i + 1 == argc)
                usage();
            settings[s] = strtol(argv[++i], &end, 10);
            if (*end != '\0' || settings[s] < 0)
                fail("%s wants a non-negative integer, got '%s'", SETTINGS[s].flag, argv[i]);
        } else if (dir_count < 3) {
            dirs[dir_count++] = argv[i];
        } else {
            usage();
        }
    }
    if (dir_count != 3)
        usage();

    /* sizes: flags first, then the manifest; the manifest may be absent when flags give all */
    join_path(path, dirs[0], "manifest.json");
    manifest = read_text(path);
    for (i = 0; i < SETTING_COUNT; i++)
        if (settings[i] < 0) {
            if (manifest == NULL)
                fail("%s: cannot read it, and %s was not given", path, SETTINGS[i].flag);
            if (!json_integer(manifest, SETTINGS[i].manifest_path, &settings[i]))
                fail("%s: no integer at %s; give %s", path, SETTINGS[i].manifest_path, SETTINGS[i].flag);
        }

    m = (int)settings[LATENT_CHANNELS];
    height = (int)settings[HEIGHT];
    width = (int)settings[WIDTH];
    require(settings[ACT_BITS] >= 8 && settings[ACT_BITS] <= 24, "activation bits in [8, 24]", settings[ACT_BITS]);
    require(settings[PRECISION_BITS] >= settings[ACT_BITS] + 2 && settings[PRECISION_BITS] <= 32,
            "precision bits in [A + 2, 32]", settings[PRECISION_BITS]);
    require(settings[WEIGHT_BITS] >= 2 && settings[WEIGHT_BITS] <= 24, "weight bits in [2, 24]", settings[WEIGHT_BITS]);
    require(settings[MULTIPLIER_BITS] >= 1 && settings[MULTIPLIER_BITS] <= 32, "multiplier bits in [1, 32]",
            settings[MULTIPLIER_BITS]);
    require(settings[SHIFT_BITS] >= 1 && settings[SHIFT_BITS] <= 6, "shift bits in [1, 6]", settings[SHIFT_BITS]);
    require(settings[BLOCK_IN] >= 1 && settings[BLOCK_IN] <= 1024, "block_in in [1, 1024]", settings[BLOCK_IN]);
    require(settings[BLOCK_OUT] >= 1 && settings[BLOCK_OUT] <= 1024, "block_out in [1, 1024]", settings[BLOCK_OUT]);
    require(m >= 1 && m <= 4096 && m % settings[BLOCK_IN] == 0 && (2 * m) % settings[BLOCK_OUT] == 0,
            "M a multiple of block_in, 2M of block_out", m);
    require(height >= 1 && height <= 65536, "height in [1, 65536]", height);
    require(width >= 1 && width <= 65536, "width in [1, 65536]", width);

    dp.act_bits = (int)settings[ACT_BITS];
    dp.residual_bits = (int)(settings[PRECISION_BITS] - settings[ACT_BITS]);
    dp.latent_shift = dp.act_bits - 8;
    dp.block_in = (int)settings[BLOCK_IN];
    dp.block_out = (int)settings[BLOCK_OUT];
    dp.act_max = ((int64_t)1 << (dp.act_bits - 1)) - 1;

    /* the engine's fixed architecture: ctx1 3x3 (M -> 2M) over three stacked rows, ctx2 and ep 1x3 (2M -> 2M) */
    {
        static const char *const names[LAYER_COUNT] = {"ctx1", "ctx2", "ep"};
        static const int kernel_h[LAYER_COUNT] = {3, 1, 1};
        for (l = 0; l < LAYER_COUNT; l++) {
            Layer *layer = &layers[l];
            long blocks = settings[CTX1_BLOCKS + l], manifest_value;
            size_t slots;
            layer->name = names[l];
            layer->kernel_h = kernel_h[l];
            layer->kernel_w = 3;
            layer->row_channels = l == CTX1 ? m : 2 * m;
            layer->in_buffer_channels = layer->kernel_h * layer->row_channels;
            layer->out_channels = 2 * m;
            layer->out_groups = 2 * m / dp.block_out;
            layer->index_channels = l == EP;
            for (i = 0; i < 2; i++) {
                int expected = i == 0 ? layer->kernel_h : layer->kernel_w;
                snprintf(path, sizeof path, "context_layers/%s/kernel/%d", names[l], i);
                if (manifest != NULL && json_integer(manifest, path, &manifest_value) && manifest_value != expected)
                    fail("manifest.json: %s has kernel %s %ld; the engine's %s is %dx%d", names[l],
                         i == 0 ? "height" : "width", manifest_value, names[l], layer->kernel_h, layer->kernel_w);
            }
            require(blocks >= 1 && blocks <= layer->in_buffer_channels / dp.block_in * layer->kernel_w,
                    "blocks per group in [1, taps x input groups]", blocks);
            layer->blocks_per_group = (int)blocks;
            slots = (size_t)layer->out_groups * layer->blocks_per_group;
            layer->weights = checked_calloc(slots * dp.block_out * dp.block_in, sizeof(int32_t), "weights");
            layer->channel_pointer = checked_calloc(slots, sizeof(int32_t), "channel pointers");
            layer->column_offset = checked_calloc(slots, sizeof(int32_t), "horizontal offsets");
            layer->bias = checked_calloc((size_t)layer->out_channels, sizeof(int64_t), "biases");
            layer->multiplier = checked_calloc((size_t)layer->out_channels, sizeof(int64_t), "multipliers");
            layer->shift = checked_calloc((size_t)layer->out_channels, sizeof(int32_t), "shifts");
        }
    }
    free(manifest);

    load_weights(layers, &dp, ((int64_t)1 << (settings[WEIGHT_BITS] - 1)) - 1, dirs[0]);
    load_scales(layers, (int)settings[MULTIPLIER_BITS], (int)settings[SHIFT_BITS], dirs[0]);
    load_biases(layers, &dp, (int)settings[PRECISION_BITS], dirs[0]);

    pixels = (long)height * width;
    y = read_tensor(dirs[1], "y.txt", pixels, m, dp.act_max);
    hyper = read_tensor(dirs[1], "hyper.txt", pixels, 2 * m, dp.act_max);
    golden_symbols = read_tensor(dirs[1], "symbols.txt", pixels, m, SYMBOL_MAX);
    golden_pdf_index = read_tensor(dirs[1], "pdf_index.txt", pixels, m, SCALE_LEVELS - 1);
    symbols = checked_calloc((size_t)pixels * m, sizeof *symbols, "symbols");
    pdf_index = checked_calloc((size_t)pixels * m, sizeof *pdf_index, "pdf indices");

    run_engine(layers, &dp, height, width, m, y, hyper, symbols, pdf_index);
    write_tensor(dirs[2], "symbols.txt", symbols, pixels, m);
    write_tensor(dirs[2], "pdf_index.txt", pdf_index, pixels, m);

    printf("latent %d x %d x %d, A = %d, r = %d, blocks per group %d/%d/%d\n", height, width, m, dp.act_bits,
           dp.residual_bits, layers[CTX1].blocks_per_group, layers[CTX2].blocks_per_group,
           layers[EP].blocks_per_group);
    mismatches = compare("symbols", symbols, golden_symbols, height, width, m);
    mismatches += compare("pdf_index", pdf_index, golden_pdf_index, height, width, m);
    for (l = 0; l < LAYER_COUNT; l++) {
        free(layers[l].weights);
        free(layers[l].channel_pointer);
        free(layers[l].column_offset);
        free(layers[l].bias);
        free(layers[l].multiplier);
        free(layers[l].shift);
    }
    free(y);
    free(hyper);
    free(symbols);
    free(pdf_index);
    free(golden_symbols);
    free(golden_pdf_index);
    if (mismatches != 0) {
        printf("FAIL: %ld values differ from the golden set in %s\n", mismatches, dirs[1]);
        return 1;
    }
    printf("OK: symbols and pdf indices match the golden set in %s\n", dirs[1]);
    return 0;
}
