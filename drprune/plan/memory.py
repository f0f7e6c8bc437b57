"""Per-rank memory of a training run: what each part holds, and the peak over the phases of a step.

Terms (bytes per rank; W the ranks a sharded tensor is split over, 1 without FSDP):
- weights: fp32 master copies, 4 P / W; plus a working copy while the step runs: autocast's 16-bit
  casts of every matmul weight without FSDP (kept for backward), FSDP's gathered units in the
  mixed-precision dtype (FULL_SHARD: the embedding unit and two blocks at a time; SHARD_GRAD_OP: all);
- gradients: fp32, 4 P / W, only for weights that train; DDP adds its gradient buckets (another 4 P);
- optimizer state: DecoupledAdamW's exp_avg and exp_avg_sq, fp32, 8 P / W;
- mask generator: never sharded (drprune.parallel keeps it whole on every rank): weights, gradients and
  two Adam states in fp32 (16 B per parameter), its buffers and a few fp32 tensors the size of the masks;
- teacher: frozen, in its storage dtype, sharded like the student under FSDP;
- activations: `drprune.plan.activations`, per microbatch;
- logits: the student's [B, T, V] in the compute dtype, kept in Composer's `state.outputs` until the
  next forward, the fused losses' gradient buffers of the same size (one for cross-entropy, one for
  the KL) and the teacher's logits; on top of them the loss's largest transient (`_loss_transient`:
  a chunk of fp32 working set, `drprune.models.losses`, or the summed loss gradients, or the head's
  weight gradient as backward starts).

Phases: the forward and loss (activations, logits and the loss's transient; gradients of earlier
microbatches); with checkpointing, backward rebuilding a block (the kept block inputs, the logits in
`state.outputs`, the head's weight gradient, one block's activations); the end of backward and the
optimizer step (every gradient, DecoupledAdamW's two temporaries the size of the largest parameter,
the logits still in `state.outputs`) and, for a run that evaluates, an eval batch on top of the same.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from drprune.models.config import ModelConfig
from drprune.models.losses import CHUNK_ELEMENTS
from drprune.models.shapes import config_params
from drprune.plan.activations import ActivationSetup, activation_bytes, no_grad_layer_bytes, recomputed_bytes

Strategy = Literal["single", "ddp", "full_shard", "shard_grad_op"]
ADAM_STATES = 2  # DecoupledAdamW: exp_avg, exp_avg_sq
MASK_WORKING_COPIES = 8  # fp32 tensors the size of the masks a generator's forward keeps (noise, samples, graph)
# fp32 bytes per logit of one loss chunk's working set, for 16-bit and fp32 logits (drprune.models.losses):
# cross-entropy upcasts the chunk and holds exp and its masked copy (plus the cast back); the KL holds
# both log-softmaxes, the teacher's probabilities and two temporaries
CE_WORKING = {2: 14, 4: 8}
KL_WORKING = {2: 26, 4: 24}
EVAL_CE_WORKING = {2: 8, 4: 4}  # without gradients: the upcast chunk and logsumexp's temporary
EVAL_KL_WORKING = 20


@dataclass(frozen=True)
class Layout:
    """How the ranks hold the run (from `drprune.parallel.plan_sharding` and the world size)."""

    world_size: int
    strategy: Strategy
    checkpointing: bool
    gather_bytes: int = 4  # bytes per weight FSDP gathers (the mixed-precision param dtype)

    @property
    def sharded(self) -> bool:
        return self.strategy in ("full_shard", "shard_grad_op")

    @property
    def shards(self) -> int:
        return self.world_size if self.sharded else 1


@dataclass(frozen=True)
class Teacher:
    """The distillation teacher as one rank holds it (`stored` False: the frozen student is the teacher)."""

    cfg: ModelConfig
    storage_bytes: int
    logits_bytes: int
    kl_gradient: bool  # kl_weight > 0: the KL has a gradient buffer
    stored: bool = True


@dataclass(frozen=True)
class MemoryInputs:
    """Everything the memory of one rank depends on."""

    model: ModelConfig
    activations: ActivationSetup
    layout: Layout
    microbatch: int
    microbatches: int  # per rank and optimizer step
    seq_len: int
    eval_batch: int | None = None  # None: the run does not evaluate
    mask_params: int = 0
    mask_buffers: int = 0
    mask_units: int = 0  # entries of the MaskSet the generator emits
    teacher: Teacher | None = None


@dataclass(frozen=True)
class Term:
    """One part of a rank's memory: bytes and how they were counted."""

    name: str
    bytes: int
    detail: str


@dataclass(frozen=True)
class MemoryPlan:
    """A rank's memory: the terms, and each phase's total (the largest is the peak)."""

    terms: dict[str, Term]
    phases: dict[str, int]
    activations_full: int
    activations_checkpointed: int  # kept block inputs plus one rebuilt block

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda name: self.phases[name])

    @property
    def peak(self) -> int:
        return self.phases[self.peak_phase]

    def largest_term(self, phase: str | None = None) -> Term:
        """The biggest term that counts in `phase` (default: the peak's)."""
        names = PHASE_TERMS[phase or self.peak_phase]
        return max((self.terms[n] for n in names if n in self.terms), key=lambda t: t.bytes)


PHASE_TERMS = {
    "forward + loss": ("weights", "weight working copy", "gradients", "optimizer state", "mask generator",
                       "teacher", "teacher working copy", "activations", "logits", "loss working set"),
    "backward (recomputation)": ("weights", "weight working copy", "gradients", "optimizer state", "mask generator",
                                 "teacher", "activations", "logits"),
    "backward end + optimizer step": ("weights", "gradients", "optimizer state", "mask generator", "teacher",
                                      "logits", "step temporaries"),
    "evaluation": ("weights", "weight working copy", "gradients", "optimizer state", "mask generator", "teacher",
                   "logits", "eval batch"),
}


def _norm_params(cfg: ModelConfig) -> int:
    return (2 * cfg.n_layers + 1) * cfg.d_model * (2 if cfg.norm == "layernorm" else 1)


def embedding_unit(cfg: ModelConfig) -> int:
    """Parameters outside the blocks (embedding, output head, final norm): the decoder's own FSDP unit."""
    return cfg.vocab_size * cfg.d_model * (1 if cfg.tie_word_embeddings else 2) + cfg.d_model * (
        2 if cfg.norm == "layernorm" else 1)


def block_params(cfg: ModelConfig) -> int:
    """Parameters of one block (the largest, for per-layer shapes)."""
    if cfg.is_uniform:
        return (config_params(cfg) - embedding_unit(cfg)) // cfg.n_layers
    return max(config_params(replace(cfg, n_layers=1, layers=[cfg.layer_spec(i)])) - embedding_unit(cfg)
               for i in range(cfg.n_layers))


def cast_params(cfg: ModelConfig) -> int:
    """Weights autocast casts for matmuls: every Linear (biases too) and the output head, not the lookup."""
    lookup = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.d_model
    return config_params(cfg) - _norm_params(cfg) - lookup


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _weights(inp: MemoryInputs, params: int) -> tuple[Term, Term]:
    lay, cfg, c = inp.layout, inp.model, inp.activations.compute_bytes
    master = Term("weights", 4 * params // lay.shards,
                  f"{params:,} parameters x 4 B (fp32 master)" + (f" / {lay.shards} ranks" if lay.sharded else ""))
    if lay.strategy == "full_shard":
        gathered = lay.gather_bytes * (embedding_unit(cfg) + 2 * block_params(cfg))
        work = Term("weight working copy", gathered, f"FSDP gathers units in {lay.gather_bytes} B: the "
                    "embedding/head unit and two blocks (one prefetched) at a time")
    elif lay.strategy == "shard_grad_op":
        work = Term("weight working copy", lay.gather_bytes * params,
                    f"SHARD_GRAD_OP keeps every gathered weight ({lay.gather_bytes} B) from forward to backward")
    elif c < 4:
        work = Term("weight working copy", c * cast_params(cfg),
                    f"autocast's {c} B copies of the {cast_params(cfg):,} matmul weights, kept for backward")
    else:
        work = Term("weight working copy", 0, "none (fp32 matmuls use the master weights)")
    return master, work


def _gradients(inp: MemoryInputs, params: int) -> Term:
    lay = inp.layout
    if not inp.activations.trainable:
        return Term("gradients", 0, "none: the LLM's weights are frozen (the mask generator's are counted with it)")
    grads = 4 * params // lay.shards
    detail = f"{params:,} x 4 B (fp32)" + (f" / {lay.shards} ranks" if lay.sharded else "")
    if lay.strategy == "ddp":
        grads += 4 * params
        detail += " + DDP's gradient buckets (a second fp32 copy)"
    return Term("gradients", grads, detail)


def _mask_generator(inp: MemoryInputs) -> Term:
    if not inp.mask_params:
        return Term("mask generator", 0, "none")
    per_param = 4 * (2 + ADAM_STATES) + (4 if inp.layout.strategy == "ddp" else 0)
    total = per_param * inp.mask_params + 4 * inp.mask_buffers + 4 * MASK_WORKING_COPIES * inp.mask_units
    buffers = f"{inp.mask_buffers:,} buffer entries, " if inp.mask_buffers else ""
    return Term("mask generator", total,
                f"{inp.mask_params:,} parameters x {per_param} B (fp32 weight, gradient, 2 Adam states"
                f"{', DDP bucket' if inp.layout.strategy == 'ddp' else ''}), replicated on every rank; "
                f"{buffers}{MASK_WORKING_COPIES} fp32 working tensors of the {inp.mask_units:,} mask entries")


def _teacher(inp: MemoryInputs) -> tuple[Term, Term]:
    t, lay = inp.teacher, inp.layout
    if t is None:
        return Term("teacher", 0, "no distillation"), Term("teacher working copy", 0, "none")
    if not t.stored:
        return (Term("teacher", 0, "the frozen LLM's unmasked forward is the teacher (no second copy)"),
                Term("teacher working copy", 0, "none"))
    params = config_params(t.cfg)
    held = Term("teacher", t.storage_bytes * params // lay.shards,
                f"{params:,} frozen parameters x {t.storage_bytes} B" + (f" / {lay.shards} ranks" if lay.sharded
                                                                         else ""))
    if lay.sharded:
        work = Term("teacher working copy", lay.gather_bytes * (embedding_unit(t.cfg) + 2 * block_params(t.cfg)),
                    "FSDP gathers the teacher's units for its forward, as the student's")
    else:
        work = Term("teacher working copy", 0, "none (autocast keeps no copy of frozen weights)")
    return held, work


def _logits(inp: MemoryInputs) -> Term:
    """The logits and the fused losses' gradient buffers, from the loss into backward."""
    cfg, c, t = inp.model, inp.activations.compute_bytes, inp.teacher
    tokens = inp.microbatch * inp.seq_len
    per_token = 2 * c  # the student's logits and cross-entropy's gradient buffer
    parts = [f"student logits and the cross-entropy gradient ({c} B each)"]
    if t is not None:
        per_token += t.logits_bytes + (c if t.kl_gradient else 0)
        parts.append(f"teacher logits ({t.logits_bytes} B)" + (" and the KL gradient" if t.kl_gradient else ""))
    return Term("logits", tokens * cfg.vocab_size * per_token,
                f"{inp.microbatch} x {inp.seq_len} tokens x {cfg.vocab_size} vocabulary: " + ", ".join(parts))


def _loss_transient(inp: MemoryInputs) -> Term:
    """The largest of three moments on top of the logits term, around the loss and the start of backward:
    one chunk of the losses' fp32 working set; autograd summing the cross-entropy and KL gradients (they
    reach the logits through views, which it does not add in place); the output head's weight gradient
    while the logits' gradient is alive (under autocast computed in 16 bits, then cast to fp32, by when
    the logits' gradient is gone)."""
    cfg, c, t = inp.model, inp.activations.compute_bytes, inp.teacher
    tokens = inp.microbatch * inp.seq_len
    logits = tokens * cfg.vocab_size * c
    buffers = logits * (2 if t is not None and t.kl_gradient else 1)
    rows = min(tokens, max(1, CHUNK_ELEMENTS // cfg.vocab_size))
    working = CE_WORKING[c] if t is None else max(CE_WORKING[c], KL_WORKING[c])
    moments = {f"one loss chunk in fp32 ({rows} positions x {working} B per logit)": buffers
               + rows * cfg.vocab_size * working}
    if buffers > logits:
        moments["autograd's sum of the cross-entropy and KL gradients"] = buffers + logits
    if inp.activations.trainable:
        head = cfg.vocab_size * cfg.d_model
        moments["the output head's fp32 weight gradient"] = (
            logits + 4 * head if c == 4 else max(logits + c * head, (c + 4) * head))
    name = max(moments, key=lambda k: moments[k])
    return Term("loss working set", moments[name] - buffers, f"the largest moment: {name}")


def _persistent_logits(inp: MemoryInputs) -> int:
    """Logits Composer keeps in `state.outputs` after the loss (the student's and the teacher's)."""
    per_token = inp.activations.compute_bytes + (inp.teacher.logits_bytes if inp.teacher is not None else 0)
    return inp.microbatch * inp.seq_len * inp.model.vocab_size * per_token


def _step_temporaries(inp: MemoryInputs, params: int) -> Term:
    cfg, lay = inp.model, inp.layout
    if not inp.activations.trainable:
        return Term("step temporaries", 0, "none worth counting (only the mask generator steps)")
    largest = max(cfg.vocab_size * cfg.d_model, cfg.intermediate_size * cfg.d_model)
    optimizer = 2 * 4 * largest // lay.shards
    head = 4 * cfg.vocab_size * cfg.d_model if (cfg.tie_word_embeddings or lay.sharded) else 0
    if head > optimizer:
        why = "(tied: the head's and the lookup's)" if cfg.tie_word_embeddings else "before its reduce-scatter"
        return Term("step temporaries", head, f"the embedding's fp32 gradient being accumulated {why}")
    return Term("step temporaries", optimizer, "DecoupledAdamW's two fp32 temporaries of the largest parameter"
                + (f" shard (/ {lay.shards})" if lay.sharded else ""))


def _eval_batch(inp: MemoryInputs) -> Term:
    cfg, c, t = inp.model, inp.activations.compute_bytes, inp.teacher
    tokens = inp.eval_batch * inp.seq_len
    per_token = c + (t.logits_bytes if t is not None else 0)
    rows = min(tokens, max(1, CHUNK_ELEMENTS // cfg.vocab_size))
    working = EVAL_CE_WORKING[c] if t is None else max(EVAL_CE_WORKING[c], EVAL_KL_WORKING)
    layer = no_grad_layer_bytes(cfg, inp.activations)
    total = tokens * (cfg.vocab_size * per_token + layer) + rows * cfg.vocab_size * working
    return Term("eval batch", total, f"{inp.eval_batch} x {inp.seq_len} tokens: logits"
                + (" and the teacher's" if t is not None else "") + ", one loss chunk, one layer's temporaries")


def plan_memory(inp: MemoryInputs) -> MemoryPlan:
    """Every term of one rank's memory and each phase's total."""
    params, lay = config_params(inp.model), inp.layout
    weights, work = _weights(inp, params)
    grads = _gradients(inp, params)
    trainable = params if inp.activations.trainable else 0
    optimizer = Term("optimizer state", 4 * ADAM_STATES * trainable // lay.shards,
                     "DecoupledAdamW exp_avg + exp_avg_sq, fp32" + (f", / {lay.shards} ranks" if lay.sharded else "")
                     if trainable else "none: the LLM's weights are frozen")
    mask = _mask_generator(inp)
    teacher, teacher_work = _teacher(inp)
    full = activation_bytes(inp.model, inp.activations, inp.microbatch, inp.seq_len, False)
    kept = activation_bytes(inp.model, inp.activations, inp.microbatch, inp.seq_len, True)
    rebuilt = recomputed_bytes(inp.model, inp.activations, inp.microbatch, inp.seq_len)
    acts = Term("activations", kept if lay.checkpointing else full,
                f"{inp.microbatch} x {inp.seq_len} tokens, "
                + (f"checkpointed: each block keeps its input, backward rebuilds one block at a time "
                   f"({_gib(rebuilt)}; without checkpointing: {_gib(full)})" if lay.checkpointing
                   else f"no checkpointing (with it: {_gib(kept)} + one block rebuilt in backward, {_gib(rebuilt)})"))
    logits, working = _logits(inp), _loss_transient(inp)
    temporaries = _step_temporaries(inp, params)
    terms = {t.name: t for t in (weights, work, grads, optimizer, mask, teacher, teacher_work, acts, logits,
                                 working, temporaries)}
    static = weights.bytes + optimizer.bytes + mask.bytes + teacher.bytes
    ddp_buckets = 4 * trainable if lay.strategy == "ddp" else 0
    earlier = grads.bytes if inp.microbatches > 1 else ddp_buckets
    phases = {"forward + loss": static + work.bytes + teacher_work.bytes + acts.bytes + logits.bytes + earlier
              + working.bytes}
    if lay.checkpointing:
        # a rebuilt block, once the logits' gradient is gone and the head's weight gradient made; as backward
        # goes down the blocks their kept inputs go while their (sharded) gradients come: the larger counts
        head = 4 * inp.model.vocab_size * inp.model.d_model if inp.activations.trainable else 0
        in_flight = acts.bytes + grads.bytes if inp.microbatches > 1 else max(acts.bytes, grads.bytes)
        phases["backward (recomputation)"] = (static + work.bytes + in_flight + _persistent_logits(inp) + head
                                              + rebuilt)
    phases["backward end + optimizer step"] = static + grads.bytes + _persistent_logits(inp) + temporaries.bytes
    if inp.eval_batch is not None:
        eval_batch = _eval_batch(inp)
        terms[eval_batch.name] = eval_batch
        phases["evaluation"] = (static + work.bytes + grads.bytes + _persistent_logits(inp) + eval_batch.bytes)
    return MemoryPlan(terms, phases, full, kept + rebuilt)
