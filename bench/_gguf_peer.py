"""The llama.cpp side of bench/llm_peer.py, run by the peer venv's Python (it imports only
``gguf``, ``llama_cpp`` and numpy, none of which the project depends on).

    python _gguf_peer.py write WEIGHTS.npz TOKENIZER.json CONFIG.json OUT.gguf
    python _gguf_peer.py greedy MODEL.gguf TOKENS PROMPT...      (prints JSON)

``write`` lays the tiny decoder's weights out as llama.cpp's ``gpt2`` architecture: one fused
QKV matrix per layer, every linear weight transposed to llama.cpp's [out, in], LayerNorm
weights of ones, and zero biases where gpt2 has them (the decoder has none).  All tensors stay
float32.  The tokenizer becomes a ``gpt2`` BPE vocabulary with the GPT-2 pre-tokenizer, which
is what the byte-level BPE trained by ``tokenizers`` uses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def write(weights_npz: Path, tokenizer_json: Path, config_json: Path, out: Path) -> None:
    import gguf

    w = dict(np.load(weights_npz))
    cfg = json.loads(config_json.read_text())
    e, layers, heads, ffn, ctx = cfg["hidden"], cfg["layers"], cfg["heads"], cfg["ffn"], cfg["context"]
    tok = json.loads(tokenizer_json.read_text())
    vocab = tok["model"]["vocab"]
    special = {t["id"] for t in tok["added_tokens"] if t.get("special")}
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    writer = gguf.GGUFWriter(str(out), "gpt2")
    writer.add_name("sovereign-appliance bench decoder")
    writer.add_context_length(ctx)
    writer.add_embedding_length(e)
    writer.add_feed_forward_length(ffn)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_layer_norm_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(cfg["eos"])
    writer.add_eos_token_id(cfg["eos"])
    writer.add_add_bos_token(False)

    def put(name: str, array: np.ndarray) -> None:
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))

    ones, zeros = np.ones(e, np.float32), np.zeros(e, np.float32)
    put("token_embd.weight", w["embed"])  # [vocab, e]: ggml reads it as ne = {e, vocab}
    put("position_embd.weight", w["pos_embed"])
    for i in range(layers):
        b = f"blk.{i}"
        put(f"{b}.attn_norm.weight", w[f"l{i}.attn.ln_scale"])
        put(f"{b}.attn_norm.bias", w[f"l{i}.attn.ln_bias"])
        put(f"{b}.attn_qkv.weight", np.concatenate([w[f"l{i}.wq"].T, w[f"l{i}.wk"].T, w[f"l{i}.wv"].T]))
        put(f"{b}.attn_qkv.bias", np.zeros(3 * e, np.float32))
        put(f"{b}.attn_output.weight", w[f"l{i}.wo"].T)
        put(f"{b}.attn_output.bias", zeros)
        put(f"{b}.ffn_norm.weight", w[f"l{i}.ffn.ln_scale"])
        put(f"{b}.ffn_norm.bias", w[f"l{i}.ffn.ln_bias"])
        put(f"{b}.ffn_up.weight", w[f"l{i}.w1"].T)
        put(f"{b}.ffn_up.bias", np.zeros(ffn, np.float32))
        put(f"{b}.ffn_down.weight", w[f"l{i}.w2"].T)
        put(f"{b}.ffn_down.bias", zeros)
    put("output_norm.weight", w.get("final.ln_scale", ones))
    put("output_norm.bias", w.get("final.ln_bias", zeros))
    put("output.weight", w["lm_head"].T)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def greedy(model: Path, tokens: int, prompts: list[str]) -> None:
    from llama_cpp import Llama

    # float32 KV cache (llama.cpp's default is f16), two threads as onnxruntime uses here
    llm = Llama(str(model), n_ctx=512, n_threads=2, n_threads_batch=2, type_k=0, type_v=0,
                verbose=False, seed=0)
    eos = llm.token_eos()
    results = []
    for prompt in prompts:
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
        out: list[int] = []
        for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(t))
            if t == eos or len(out) == tokens:
                break
        results.append({"prompt_ids": [int(i) for i in ids], "ids": out})
    print(json.dumps(results))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(*(Path(a) for a in sys.argv[2:6]))
    elif sys.argv[1] == "greedy":
        greedy(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}")
