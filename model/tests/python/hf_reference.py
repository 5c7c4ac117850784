"""Reference side of the parity tests: Hugging Face transformers on CPU, fp32.

create SPEC OUT: for each case of SPEC (a JSON list of {"name", "config", "input_ids", "seed"}), builds a
    random GPTBigCodeForCausalLM (LayerNorms randomised too), saves it under OUT/name with
    save_pretrained, and writes OUT/name/reference.safetensors with the logits of input_ids and
    OUT/name/greedy.json with 64 greedy tokens from model.generate(do_sample=False).
logits SPEC OUT: loads each OUT/name (a checkpoint that wizard saved) with AutoModelForCausalLM and
    writes OUT/name/hf_logits.safetensors plus OUT/name/loading.json (missing/unexpected keys).
"""
import json
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPTBigCodeConfig, GPTBigCodeForCausalLM

torch.set_num_threads(1)


def create(cases, out):
    for case in cases:
        torch.manual_seed(case["seed"])
        config = GPTBigCodeConfig(**case["config"])
        model = GPTBigCodeForCausalLM(config).eval()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.weight.normal_(1.0, 0.2)
                    module.bias.normal_(0.0, 0.2)
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.normal_(0.0, 0.05)
        directory = f"{out}/{case['name']}"
        # Some cases are sharded, to exercise model.safetensors.index.json.
        model.save_pretrained(directory, safe_serialization=True, max_shard_size=case.get("max_shard_size", "5GB"))
        ids = torch.tensor([case["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0].contiguous()
            generated = model.generate(
                ids,
                do_sample=False,
                max_new_tokens=64,
                eos_token_id=config.eos_token_id,
                pad_token_id=config.eos_token_id,
            )
        save_file({"logits": logits}, f"{directory}/reference.safetensors")
        with open(f"{directory}/greedy.json", "w") as f:
            json.dump(generated[0, ids.shape[1]:].tolist(), f)


def logits(cases, out):
    for case in cases:
        directory = f"{out}/{case['name']}"
        model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
        model.eval()
        with torch.no_grad():
            result = model(torch.tensor([case["input_ids"]])).logits[0].contiguous()
        save_file({"logits": result}, f"{directory}/hf_logits.safetensors")
        loading = {key: sorted(map(str, value)) for key, value in info.items()}
        loading["dtype"] = str(model.dtype)
        with open(f"{directory}/loading.json", "w") as f:
            json.dump(loading, f)


if __name__ == "__main__":
    mode, spec, out = sys.argv[1:]
    with open(spec) as f:
        cases = json.load(f)
    {"create": create, "logits": logits}[mode](cases, out)
