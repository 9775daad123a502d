#!/usr/bin/env python3
"""Converts a llama-architecture GGUF (as `meshlm gen-model` writes them) into distributed-llama's model
(.m) and tokenizer (.t) files, so tests/bench/peers.sh can run dllama on the same weights. Stdlib only.

usage: tests/bench/gguf2dllama.py [-o PREFIX] [--weights auto|f32] [--seq-len N] FILE.gguf
  writes PREFIX.m and PREFIX.t (default PREFIX: FILE.dllama, i.e. FILE.dllama.m beside FILE.gguf)

Facts about dllama's formats this relies on (read from distributed-llama's src/llm.cpp, src/tokenizer.cpp
and src/nn/nn-quants.hpp at commit 8d624a7; none of its code is used here):
  .m  int32 magic 0xA00ABCD, int32 header size in bytes (counting magic and size), then int32 (key, value)
      pairs; the weights start right after the header, in this order:
        embedding F32 (vocab, dim)
        per layer: q (qDim, dim), k (kvDim, dim), v (kvDim, dim), wo (dim, qDim), w1 (ffn, dim),
                   w2 (dim, ffn), w3 (ffn, dim) in the weight type; attn norm F32 (dim); ffn norm F32 (dim)
        final norm F32 (dim); classifier (vocab, dim) in the weight type
      matrices are (rows, columns) row-major with rows along the output, as in GGUF.
  weight types: F32 = 0, F16 = 1, Q40 = 2, Q80 = 3. Q40 and Q80 blocks are ggml's Q4_0 and Q8_0 byte for
      byte (an f16 scale, then 16 bytes of nibbles, element j low and j+16 high, minus 8; or 32 int8).
      dllama's CPU matmul takes only Q40 weights (run with --buffer-float-type q80) or F32 weights
      (--buffer-float-type f32); F16 and Q80 weight files load but have no CPU kernel.
  rope: dllama's Llama rope turns adjacent pairs (x[2i], x[2i+1]) and its own Hugging Face converter
      permutes the Q and K rows into that order, the same permutation llama.cpp's converter applies; so
      GGUF's Q and K rows are already in dllama's order and are copied as they are.
  norm epsilon is stored as 5 (1e-5) or 6 (1e-6); rope theta as an integer.
  .t  int32 magic 0x567124, int32 header size, (key, value) pairs (version = 1, vocab size, max token
      length, bos id, number of eos ids, add bos), the eos ids, then per token: f32 score, u32 length, bytes.
      dllama treats the ids below bos_id as ordinary tokens and those from it on as special ones.
      A Llama-2 vocabulary has BOS = 1 (only <unk> below it), so dllama could not encode text with it:
      for such a vocabulary the .t names the last token as bos with add_bos = 0, and dllama's prompts
      start without BOS (compare with meshlm run --no-bos). SentencePiece's U+2581 becomes a space, and
      <0xNN> byte tokens become that byte unless a token of that single byte exists already.
"""
import argparse
import array
import mmap
import os
import struct
import sys

GGUF_MAGIC = 0x46554747
DLLAMA_MODEL_MAGIC = 0xA00ABCD
DLLAMA_TOKENIZER_MAGIC = 0x567124
ARCH_LLAMA = 0xABCD00
HIDDEN_ACT_SILU = 1
DL_F32, DL_Q40 = 0, 2

# ggml tensor types: name, elements per block, bytes per block
GGML_TYPES = {
    0: ('F32', 1, 4), 1: ('F16', 1, 2), 2: ('Q4_0', 32, 18), 3: ('Q4_1', 32, 20), 6: ('Q5_0', 32, 22),
    7: ('Q5_1', 32, 24), 8: ('Q8_0', 32, 34), 9: ('Q8_1', 32, 36), 10: ('Q2_K', 256, 84),
    11: ('Q3_K', 256, 110), 12: ('Q4_K', 256, 144), 13: ('Q5_K', 256, 176), 14: ('Q6_K', 256, 210),
    15: ('Q8_K', 256, 292), 30: ('BF16', 1, 2),
}
T_F32, T_F16, T_Q4_0, T_Q8_0, T_BF16 = 0, 1, 2, 8, 30

# GGUF metadata value types -> struct codes (8 = string, 9 = array)
GGUF_SCALARS = {0: 'B', 1: 'b', 2: 'H', 3: 'h', 4: 'I', 5: 'i', 6: 'f', 7: '?', 10: 'Q', 11: 'q', 12: 'd'}


class ConvertError(Exception):
    pass


class Gguf:
    """A GGUF file read through mmap: metadata in self.kv, tensors in self.tensors (name -> (type, dims, offset))."""

    def __init__(self, path):
        self.path = path
        try:
            f = open(path, 'rb')
        except OSError as e:
            raise ConvertError(f'{path}: cannot open: {e.strerror}')
        with f:
            try:
                self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise ConvertError(f'{path}: cannot map: {e}')
        self.pos = 0
        magic, version = self._read('II')
        if magic != GGUF_MAGIC:
            raise ConvertError(f'{path}: not a GGUF file (magic 0x{magic:08x})')
        if version not in (2, 3):
            raise ConvertError(f'{path}: GGUF version {version} is not supported (2 and 3 are)')
        n_tensors, n_kv = self._read('QQ')
        self.kv = {}
        for _ in range(n_kv):
            key = self._string().decode('utf-8', errors='replace')
            (vtype,) = self._read('I')
            self.kv[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._string().decode('utf-8', errors='replace')
            (n_dims,) = self._read('I')
            dims = self._read('Q' * n_dims)
            ttype, offset = self._read('IQ')
            infos.append((name, ttype, dims, offset))
        align = self.kv.get('general.alignment', 32)
        data_start = (self.pos + align - 1) // align * align
        self.tensors = {}
        for name, ttype, dims, offset in infos:
            if ttype not in GGML_TYPES:
                raise ConvertError(f'{path}: tensor {name} has unknown ggml type {ttype}')
            start = data_start + offset
            if start + tensor_bytes(ttype, dims) > len(self.buf):
                raise ConvertError(f'{path}: tensor {name} runs past the end of the file (truncated?)')
            self.tensors[name] = (ttype, dims, start)

    def _read(self, fmt):
        fmt = '<' + fmt
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ConvertError(f'{self.path}: truncated header at byte {self.pos}')
        vals = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return vals

    def _string(self):
        (n,) = self._read('Q')
        if self.pos + n > len(self.buf):
            raise ConvertError(f'{self.path}: truncated string at byte {self.pos}')
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s

    def _value(self, vtype):
        if vtype in GGUF_SCALARS:
            return self._read(GGUF_SCALARS[vtype])[0]
        if vtype == 8:
            return self._string()
        if vtype == 9:
            etype, n = self._read('IQ')
            if etype in GGUF_SCALARS:  # one unpack for the whole array
                return list(self._read(GGUF_SCALARS[etype] * n)) if n else []
            return [self._value(etype) for _ in range(n)]
        raise ConvertError(f'{self.path}: unknown metadata value type {vtype} at byte {self.pos}')

    def tensor(self, name):
        if name not in self.tensors:
            raise ConvertError(f'{self.path}: no tensor {name}')
        return self.tensors[name]

    def raw(self, name):
        ttype, dims, start = self.tensor(name)
        return memoryview(self.buf)[start:start + tensor_bytes(ttype, dims)]


def tensor_bytes(ttype, dims):
    _, per_block, block_bytes = GGML_TYPES[ttype]
    n = 1
    for d in dims:
        n *= d
    return n // per_block * block_bytes


Q4_LO = [float((b & 15) - 8) for b in range(256)]
Q4_HI = [float((b >> 4) - 8) for b in range(256)]


def dequantize(path, name, ttype, data, out):
    """Appends the float values of one GGUF tensor's bytes to out (array('f')), 1 MiB-ish at a time."""
    if ttype == T_F32:
        out.frombytes(data)
    elif ttype == T_F16:
        n = len(data) // 2
        step = 1 << 20
        for i in range(0, n, step):
            k = min(step, n - i)
            out.extend(struct.unpack_from(f'<{k}e', data, 2 * i))
    elif ttype == T_BF16:
        words = array.array('H', data)
        if sys.byteorder != 'little':
            words.byteswap()
        wide = array.array('I', (w << 16 for w in words))
        out.frombytes(wide.tobytes())
    elif ttype == T_Q4_0:
        half = struct.Struct('<e').unpack_from
        for o in range(0, len(data), 18):
            d = half(data, o)[0]
            qs = data[o + 2:o + 18]
            out.extend([d * Q4_LO[b] for b in qs])
            out.extend([d * Q4_HI[b] for b in qs])
    elif ttype == T_Q8_0:
        blk = struct.Struct('<e32b').unpack_from
        for o in range(0, len(data), 34):
            v = blk(data, o)
            d = v[0]
            out.extend([d * q for q in v[1:]])
    else:
        raise ConvertError(f'{path}: tensor {name} is {GGML_TYPES[ttype][0]}; only F32, F16, BF16, Q4_0 and Q8_0 '
                           'can be converted to F32')


class Writer:
    """Streams tensors into the .m file, counting bytes."""

    def __init__(self, f):
        self.f = f
        self.n = 0

    def bytes(self, b):
        self.f.write(b)
        self.n += len(b)

    def f32(self, g, name, want_dims):
        ttype, dims, _ = g.tensor(name)
        check_dims(g, name, dims, want_dims)
        if ttype == T_F32:
            self.bytes(g.raw(name))
            return
        data = g.raw(name)
        _, per_block, block_bytes = GGML_TYPES[ttype]
        row_bytes = dims[0] // per_block * block_bytes
        rows_per_chunk = max(1, (1 << 22) // max(1, dims[0]))  # about 16 MiB of f32 per write
        for r in range(0, len(data) // row_bytes, rows_per_chunk):
            out = array.array('f')
            dequantize(g.path, name, ttype, data[r * row_bytes:(r + rows_per_chunk) * row_bytes], out)
            if sys.byteorder != 'little':
                out.byteswap()
            self.bytes(out.tobytes())

    def matrix(self, g, name, want_dims, wtype):
        if wtype == DL_F32:
            self.f32(g, name, want_dims)
            return
        ttype, dims, _ = g.tensor(name)
        check_dims(g, name, dims, want_dims)
        if ttype != T_Q4_0:  # wtype Q40 was chosen only when every matrix is Q4_0
            raise ConvertError(f'{g.path}: tensor {name} is {GGML_TYPES[ttype][0]}, expected Q4_0')
        self.bytes(g.raw(name))  # ggml Q4_0 blocks are dllama Q40 blocks


def check_dims(g, name, dims, want):
    if tuple(dims) != tuple(want):
        raise ConvertError(f'{g.path}: tensor {name} has dims {list(dims)}, expected {list(want)} '
                           '(GGUF order: columns first)')


def meta_int(g, key, default=None):
    v = g.kv.get(key, default)
    if v is None:
        raise ConvertError(f'{g.path}: no metadata key {key}')
    if isinstance(v, list) or isinstance(v, bytes):
        raise ConvertError(f'{g.path}: metadata {key} is not a single number (per-layer values are not supported)')
    return int(v)


def model_params(g, seq_len):
    arch = g.kv.get('general.architecture', b'?').decode(errors='replace')
    if arch != 'llama':
        raise ConvertError(f'{g.path}: architecture {arch} is not supported (only llama)')
    p = 'llama.'
    if meta_int(g, p + 'expert_count', 0) > 0:
        raise ConvertError(f'{g.path}: MoE (llama.expert_count > 0) is not supported by this converter')
    if p + 'rope.scaling.type' in g.kv and g.kv[p + 'rope.scaling.type'] not in (b'none', b''):
        raise ConvertError(f'{g.path}: rope scaling {g.kv[p + "rope.scaling.type"]!r} is not supported')
    dim = meta_int(g, p + 'embedding_length')
    n_heads = meta_int(g, p + 'attention.head_count')
    n_kv_heads = meta_int(g, p + 'attention.head_count_kv', n_heads)
    head_dim = meta_int(g, p + 'attention.key_length', dim // n_heads)
    rope_dim = meta_int(g, p + 'rope.dimension_count', head_dim)
    if rope_dim != head_dim:
        raise ConvertError(f'{g.path}: partial rope ({rope_dim} of {head_dim} head dims) is not supported by dllama')
    eps = float(g.kv.get(p + 'attention.layer_norm_rms_epsilon', 1e-5))
    if abs(eps - 1e-5) < 1e-9:
        eps_code = 5
    elif abs(eps - 1e-6) < 1e-10:
        eps_code = 6
    else:
        raise ConvertError(f'{g.path}: rms norm epsilon {eps:g} is not supported (dllama stores only 1e-5 or 1e-6)')
    theta = float(g.kv.get(p + 'rope.freq_base', 10000.0))
    if theta != int(theta):
        raise ConvertError(f'{g.path}: rope.freq_base {theta} is not an integer (dllama stores it as one)')
    vocab = g.tensor('token_embd.weight')[1][1]
    return {
        'dim': dim, 'hidden_dim': meta_int(g, p + 'feed_forward_length'), 'n_layers': meta_int(g, p + 'block_count'),
        'n_heads': n_heads, 'n_kv_heads': n_kv_heads, 'head_dim': head_dim, 'vocab': vocab,
        'seq_len': seq_len or meta_int(g, p + 'context_length'), 'eps_code': eps_code, 'theta': int(theta),
    }


def matrix_names(g, n_layers):
    names = []
    for i in range(n_layers):
        names += [f'blk.{i}.{t}.weight' for t in
                  ('attn_q', 'attn_k', 'attn_v', 'attn_output', 'ffn_gate', 'ffn_down', 'ffn_up')]
    names.append('output.weight' if 'output.weight' in g.tensors else 'token_embd.weight')
    return names


def write_model(g, path, mp, weights):
    names = matrix_names(g, mp['n_layers'])
    types = {GGML_TYPES[g.tensor(n)[0]][0] for n in names}
    if not types <= {'F32', 'F16', 'BF16', 'Q4_0', 'Q8_0'}:
        raise ConvertError(f'{g.path}: weight types {sorted(types)}; dllama has no equivalent of ggml\'s k-quants '
                           'and this converter dequantizes only F32, F16, BF16, Q4_0 and Q8_0')
    if weights == 'auto':
        if types != {'Q4_0'}:
            raise ConvertError(
                f'{g.path}: weight types {sorted(types)}; dllama computes on CPU only with Q40 weights (= ggml Q4_0) '
                'or F32 weights. Give --weights f32 to dequantize to F32 (4 bytes a weight: run dllama with '
                '--buffer-float-type f32; its speed is then not comparable with a quantized file)')
        wtype = DL_Q40
    else:
        wtype = DL_F32
    d, hd, qd, kvd = mp['dim'], mp['hidden_dim'], mp['head_dim'] * mp['n_heads'], mp['head_dim'] * mp['n_kv_heads']
    header = [
        (0, 0), (1, ARCH_LLAMA), (2, d), (3, hd), (4, mp['n_layers']), (5, mp['n_heads']), (6, mp['n_kv_heads']),
        (7, 0), (8, 0), (9, mp['vocab']), (10, mp['seq_len']), (11, HIDDEN_ACT_SILU), (12, mp['theta']),
        (13, wtype), (19, mp['head_dim']), (20, mp['eps_code']),
    ]
    body = b''.join(struct.pack('<ii', k, v) for k, v in header)
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        w = Writer(f)
        w.bytes(struct.pack('<ii', DLLAMA_MODEL_MAGIC, 8 + len(body)) + body)
        w.f32(g, 'token_embd.weight', (d, mp['vocab']))
        for i in range(mp['n_layers']):
            b = f'blk.{i}.'
            w.matrix(g, b + 'attn_q.weight', (d, qd), wtype)
            w.matrix(g, b + 'attn_k.weight', (d, kvd), wtype)
            w.matrix(g, b + 'attn_v.weight', (d, kvd), wtype)
            w.matrix(g, b + 'attn_output.weight', (qd, d), wtype)
            w.matrix(g, b + 'ffn_gate.weight', (d, hd), wtype)
            w.matrix(g, b + 'ffn_down.weight', (hd, d), wtype)
            w.matrix(g, b + 'ffn_up.weight', (d, hd), wtype)
            w.f32(g, b + 'attn_norm.weight', (d,))
            w.f32(g, b + 'ffn_norm.weight', (d,))
        w.f32(g, 'output_norm.weight', (d,))
        w.matrix(g, names[-1], (d, mp['vocab']), wtype)
    os.replace(tmp, path)
    return wtype, w.n


def write_tokenizer(g, path, vocab):
    tokens = g.kv.get('tokenizer.ggml.tokens')
    if not isinstance(tokens, list) or not tokens:
        raise ConvertError(f'{g.path}: no tokenizer.ggml.tokens')
    if len(tokens) != vocab:
        raise ConvertError(f'{g.path}: {len(tokens)} tokens but token_embd.weight has {vocab} rows')
    scores = g.kv.get('tokenizer.ggml.scores') or [0.0] * len(tokens)
    model = g.kv.get('tokenizer.ggml.model', b'llama')
    bos = meta_int(g, 'tokenizer.ggml.bos_token_id', 1)
    eos = meta_int(g, 'tokenizer.ggml.eos_token_id', 2)
    add_bos = bool(g.kv.get('tokenizer.ggml.add_bos_token', True))
    texts = []
    for t in tokens:
        if model == b'llama':
            t = t.replace('\u2581'.encode(), b' ')
        texts.append(t)
    if model == b'llama':
        singles = {t for t in texts if len(t) == 1}
        for i, t in enumerate(texts):
            if len(t) == 6 and t.startswith(b'<0x') and t.endswith(b'>'):
                b = bytes([int(t[3:5], 16)])
                if b not in singles:
                    texts[i] = b
    texts = [t if t else b' ' for t in texts]  # dllama reads no empty tokens
    note = ''
    types = g.kv.get('tokenizer.ggml.token_type')
    if isinstance(types, list) and len(types) == len(texts):
        normal_above = any(t == 1 for t in types[bos + 1:])  # 1: llama.cpp's NORMAL token type
    else:
        normal_above = bos < len(texts) // 2
    if normal_above:
        # dllama's encoder sees only the ids below bos as ordinary tokens; a Llama-2 vocab has none there
        note = (f'BOS {bos} leaves no ordinary tokens below it; the .t names the last token {len(texts) - 1} '
                'as bos with add_bos 0 (dllama prompts start without BOS; compare with meshlm run --no-bos)')
        bos, add_bos = len(texts) - 1, False
    header = [(0, 1), (1, len(texts)), (2, max(len(t) for t in texts)), (3, bos), (9, 1), (10, int(add_bos))]
    body = b''.join(struct.pack('<ii', k, v) for k, v in header)
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        f.write(struct.pack('<ii', DLLAMA_TOKENIZER_MAGIC, 8 + len(body)) + body)
        f.write(struct.pack('<i', eos))
        for t, s in zip(texts, scores):
            f.write(struct.pack('<fI', float(s), len(t)))
            f.write(t)
    os.replace(tmp, path)
    return note


def main(argv):
    ap = argparse.ArgumentParser(
        prog='gguf2dllama.py',
        description="Writes distributed-llama's PREFIX.m (model) and PREFIX.t (tokenizer) from a llama GGUF.",
        epilog='Q4_0 files convert as they are (Q40 blocks are ggml Q4_0 blocks): run dllama with '
               '--buffer-float-type q80. Other weight types need --weights f32 (dllama has no CPU kernel for '
               'Q80 or F16 weights); k-quants (Q4_K, Q6_K, ...) are refused. With a Llama-2 vocabulary (BOS = 1) the .t '
               'declares no usable BOS, so dllama prompts start without one (compare with meshlm run --no-bos).')
    ap.add_argument('gguf', metavar='FILE.gguf')
    ap.add_argument('-o', '--output', metavar='PREFIX', help='output prefix (default: FILE.dllama)')
    ap.add_argument('--weights', choices=('auto', 'f32'), default='auto',
                    help='auto: Q40 from an all-Q4_0 file, else an error; f32: dequantize every matrix to F32')
    ap.add_argument('--seq-len', type=int, default=0, metavar='N',
                    help="context length written to the header (default: the GGUF's llama.context_length)")
    args = ap.parse_args(argv)
    prefix = args.output or (args.gguf[:-5] if args.gguf.endswith('.gguf') else args.gguf) + '.dllama'
    try:
        g = Gguf(args.gguf)
        mp = model_params(g, args.seq_len)
        wtype, n = write_model(g, prefix + '.m', mp, args.weights)
        note = write_tokenizer(g, prefix + '.t', mp['vocab'])
    except ConvertError as e:
        print(f'gguf2dllama: {e}', file=sys.stderr)
        return 1
    except OSError as e:
        print(f'gguf2dllama: {e.filename or prefix}: {e.strerror}', file=sys.stderr)
        return 1
    print(f'{prefix}.m: {mp["n_layers"]} layers, dim {mp["dim"]}, vocab {mp["vocab"]}, '
          f'weights {"Q40 (run with --buffer-float-type q80)" if wtype == DL_Q40 else "F32 (run with --buffer-float-type f32)"}, '
          f'{n} bytes')
    print(f'{prefix}.t: {mp["vocab"]} tokens' + (f'; {note}' if note else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
