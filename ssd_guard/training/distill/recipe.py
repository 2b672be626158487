"""The distillation recipe: one YAML per base model + dataset, validated by pydantic."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ssd_guard.errors import ConfigError

__all__ = ["Recipe", "RecipeFile", "format_validation_error", "load_recipe", "load_recipe_file"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceConfig(_Strict):
    """One question set of a pooled prompt pool."""

    #: Short name; row ids become ``<name>:<row>`` and reports break results down by it.
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: str
    #: ``qa``: TriviaQA-style rows; ``open_mc``: a multiple-choice set asked as open
    #: questions (choices removed; the gold choice's text is the accepted answer);
    #: ``chat_mc``: a multiple-choice set asked with its lettered choices, as a chat user
    #: would (graded by the letter or the choice text the answer picks).
    format: Literal["qa", "open_mc", "chat_mc"] = "qa"
    limit: int | None = Field(default=None, ge=1)


class DataConfig(_Strict):
    #: A single data file (the original layout) ...
    path: str | None = None
    format: Literal["qa", "mc"] = "qa"
    limit: int | None = Field(default=None, ge=1)
    #: ... or several question sets pooled into one prompt pool. Each set is split on its
    #: own (same fractions and seed), so a set's test split does not depend on the others.
    sources: list[SourceConfig] | None = None
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seed: int = 0

    @model_validator(mode="after")
    def _one_layout(self) -> DataConfig:
        if (self.path is None) == (self.sources is None):
            raise ValueError("give exactly one of 'path' or 'sources'")
        if self.sources is not None:
            names = [s.name for s in self.sources]
            if not names or len(set(names)) != len(names):
                raise ValueError("'sources' needs at least one set, with unique names")
        return self


class PromptConfig(_Strict):
    few_shot: str = ""
    #: Python format string; ``{prompt}`` is the dataset's prompt (``Question: ...\nAnswer:``).
    template: str = "{prompt}"
    #: Ask through the base model's chat template instead (``few_shot`` / ``template``
    #: unused): the bare question is the user message, after ``system`` when given. The
    #: teacher's answers are then the chat model's own sentences, and the student reads
    #: the same chat-templated text a deployed chat model sees.
    chat: bool = False
    system: str | None = None

    @model_validator(mode="after")
    def _chat_plain(self) -> PromptConfig:
        if self.chat and (self.few_shot or self.template != "{prompt}"):
            raise ValueError("chat: true takes no few_shot / template (the chat template is used)")
        return self

    @field_validator("template")
    @classmethod
    def _has_prompt(cls, v: str) -> str:
        if "{prompt}" not in v:
            raise ValueError("must contain the placeholder {prompt}")
        return v


class ChatTeacherConfig(_Strict):
    """A chat model (an API model) that answers in place of the base model: the teacher's
    K samples and default answer come from it, asked with the bare question as the user
    message (after ``prompt.system``), while the hidden states the student reads come
    from the recipe's ``base_model``, a local *proxy* reading the same prompt. The student
    then predicts the chat model's answer distribution from the proxy's representation."""

    #: ``module:function`` called with ``options`` as keywords; it returns the answer
    #: source (:class:`~ssd_guard.training.distill.teacher_chat.AnswerSource`), e.g.
    #: ``ssd_guard.integrations.langchain.teacher:openai_teacher`` (any OpenAI-compatible
    #: endpoint through langchain-openai) or ``...:chat_model_teacher`` (a factory
    #: naming any LangChain chat model).
    factory: str
    options: dict[str, Any] = {}
    #: The answering model, as recorded in the student's manifest (e.g. ``gemma-3-270m``).
    model_id: str


class VLLMTeacherConfig(_Strict):
    """The vLLM engine of ``teacher.backend: vllm`` (the ``[vllm]`` extra)."""

    #: Keywords for ``vllm.LLM(...)`` besides the model, tokenizer, dtype and seed, e.g.
    #: ``gpu_memory_utilization`` (on vLLM's CPU build: the share of RAM it reserves),
    #: ``max_model_len``, ``enforce_eager``, ``tensor_parallel_size``.
    options: dict[str, Any] = {}
    #: Prompts handed to one ``LLM.generate`` call (vLLM batches them itself).
    batch_size: int = Field(default=256, ge=1)


class TeacherConfig(_Strict):
    n_samples: int = Field(default=10, ge=1, le=256)
    temperature: float = Field(default=1.0, gt=0)
    default_temperature: float = Field(default=0.0, ge=0)
    max_new_tokens: int = Field(default=16, ge=1, le=512)
    batch_size: int = Field(default=16, ge=1)
    shard_size: int = Field(default=64, ge=1)
    seed: int = 0
    #: Also store the hidden states mean-pooled over the question's tokens (the prompt
    #: without the few-shot prefix), at every layer, for students that read them.
    pool: bool = True
    #: Where the teacher runs: ``hf`` (this process, transformers) or ``ray`` (the shards
    #: spread over Ray Data actors, one model each; the same shards, seeds and results).
    #: Execution settings: they do not enter the stage's dependency digest, so a work dir
    #: can switch backend without resampling.
    #: ``chat``: the answers come from the chat model of ``chat`` (an API model), the
    #: hidden states from ``base_model`` (the proxy) in this process.
    #: ``vllm``: the answers are sampled by vLLM from ``base_model`` (``vllm`` section),
    #: the hidden states come from one transformers prefill of each prompt. vLLM draws
    #: other random numbers than transformers, so switching to or from ``vllm``
    #: resamples every shard.
    backend: Literal["hf", "ray", "chat", "vllm"] = "hf"
    #: Ray actors (each loads the model once); each gets ``threads_per_worker`` CPU threads.
    #: With ``backend: chat``: the chat requests in flight at once.
    workers: int = Field(default=2, ge=1)
    threads_per_worker: int = Field(default=1, ge=1)
    #: ``ray.init(address=...)``: null starts a local Ray with ``workers`` CPUs.
    ray_address: str | None = None
    #: The answering chat model of ``backend: chat`` (part of what is sampled: a change
    #: resamples every shard).
    chat: ChatTeacherConfig | None = None
    #: The engine settings of ``backend: vllm`` (how it runs, not what it samples).
    vllm: VLLMTeacherConfig | None = None

    @model_validator(mode="after")
    def _chat_backend(self) -> TeacherConfig:
        if (self.backend == "chat") != (self.chat is not None):
            raise ValueError("teacher.backend: chat and a teacher.chat section go together")
        if self.vllm is not None and self.backend != "vllm":
            raise ValueError("a teacher.vllm section needs teacher.backend: vllm")
        return self


#: TeacherConfig keys that say how the teacher runs, not what it samples.
TEACHER_EXECUTION_KEYS = frozenset(
    {"backend", "workers", "threads_per_worker", "ray_address", "vllm"}
)


class LabelConfig(_Strict):
    method: Literal["alias_match", "judge"] = "alias_match"
    containment: bool = True
    #: ``module:function`` called as ``f(question, answer, aliases) -> bool`` when method=judge.
    judge: str | None = None

    @model_validator(mode="after")
    def _judge_named(self) -> LabelConfig:
        if self.method == "judge" and not self.judge:
            raise ValueError("method 'judge' needs 'judge: module:function'")
        return self


class EmbeddingConfig(_Strict):
    embedder: str = "all-MiniLM-L6-v2"
    pca_dim_risk: int = Field(default=16, ge=1, le=1024)
    pca_dim_answer: int = Field(default=32, ge=1, le=1024)
    whiten: bool = True
    batch_size: int = Field(default=256, ge=1)
    #: Normalise answer texts before embedding (first line, "The answer is" and similar
    #: boilerplate, a final period); the artifact records it and the scorer does the same.
    normalise: bool = True
    #: Embed each answer's *core* (the words that do not restate the question, see
    #: ssd_guard.answers.answer_core) on both sides: a chat model's sentence ("The capital
    #: of Italy is Rome.") and its short form ("Rome") then get one embedding.
    core: bool = False

    @model_validator(mode="after")
    def _order(self) -> EmbeddingConfig:
        if self.pca_dim_risk > self.pca_dim_answer:
            raise ValueError("pca_dim_risk must not exceed pca_dim_answer (they share one PCA)")
        return self


class LayerConfig(_Strict):
    #: Layers (``output_hidden_states`` numbering, 0 = embeddings) to consider; null = all.
    candidates: list[int] | None = None
    #: Pin the layer instead of selecting it by probes.
    fixed: int | None = None
    #: The student's input beyond the probe-selected layer (null: that layer alone, the
    #: original SSD input). ``last``: last-token states at these layers; ``pooled``:
    #: question-mean-pooled states at these layers (needs ``teacher.pool``).
    last: list[int] | None = None
    pooled: list[int] | None = None


class StudentGrid(_Strict):
    n_components: list[int] = [1, 2, 5, 10]
    hidden: list[int] = [128, 256, 512]
    depth: list[int] = [2, 3, 4]


class StudentConfig(_Strict):
    grid: StudentGrid = StudentGrid()
    max_epochs: int = Field(default=300, ge=1)
    patience: int = Field(default=20, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    batch_size: int = Field(default=128, ge=1)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    seed: int = 0
    #: Train the risk head on *whitened* PCA coordinates (unit variance per component)
    #: instead of the plain PCA coordinates. Plain is the default: on the SmolLM2 /
    #: TriviaQA validation split its entropy predicted wrong answers better in every one
    #: of 4 seeds (AUROC 0.667 vs 0.605 on average; benchmarks/risk_targets.py),
    #: because whitening inflates the dispersion along minor components that carry
    #: little meaning.
    whiten_risk: bool = False
    #: Weight of the auxiliary term tying the risk head's entropy to the teacher's
    #: dispersion (``1 - corr(H, log TD)`` per batch); 0 = pure maximum likelihood.
    rank_weight: float = Field(default=0.0, ge=0)
    #: How the grid point of each head is chosen on the validation split: ``val_nll``
    #: (likelihood only), or ``val_fidelity`` for the risk head (Spearman correlation of
    #: its entropy with the teacher's dispersion; the answer head keeps ``val_nll``).
    select_by: Literal["val_nll", "val_fidelity"] = "val_nll"
    #: Floor on every component's standard deviation (target units), per head: keeps a
    #: component from collapsing onto one training answer.
    min_scale_risk: float = Field(default=1e-3, gt=0)
    min_scale_answer: float = Field(default=1e-3, gt=0)
    #: Train on these sources of a pooled prompt pool only (null: all).
    train_sources: list[str] | None = None
    #: Components of the unconditional answer density (for the ``pmi`` signal); 0 = none.
    marginal_components: int = Field(default=16, ge=0)
    #: Floor on the unconditional density's standard deviations (target units): an
    #: answer the model gives to many questions (e.g. a few-shot example it copies) would
    #: otherwise get a needle-thin component, and its PMI would plunge even where it is
    #: right. 0.5 was chosen on validation (benchmarks/results/marginal-floor-validation.json).
    marginal_min_scale: float = Field(default=0.5, ge=0)
    #: Score sentence-length answers on their core span too (see ssd_guard.answers).
    core_span: bool = True
    #: Store the heads' weight matrices in float16 (half the artifact's size; the heads
    #: are rounded to float16 *before* calibration, so the stored calibration values are
    #: exactly what the stored weights give).
    half_weights: bool = True
    #: The answer signal recorded as the artifact's default (chosen on validation).
    answer_signal: Literal["loglik", "pmi", "consensus"] = "loglik"


class RecipeFile(_Strict):
    """A recipe read from a YAML file: relative paths resolve against the cwd first,
    then the file's directory."""

    #: The file the recipe was loaded from.
    source: str | None = Field(default=None, exclude=True)

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        if p.is_absolute() or p.exists() or self.source is None:
            return p
        alt = Path(self.source).parent / p
        return alt if alt.exists() else p


class ModelRecipe(RecipeFile):
    """What every recipe that trains on a base model says: its name, the model, how it
    runs, the work directory and where the artifact goes."""

    name: str
    base_model: str
    #: ``auto``: bf16 on a GPU that supports it and on a CPU with native bf16
    #: (avx512_bf16 / amx_bf16), else fp32 (ssd_guard.models.auto_dtype); logged.
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    device: str | None = None
    workdir: str
    #: Where the final artifact goes (default ``<workdir>/artifact``).
    artifact: str | None = None


class Recipe(ModelRecipe):
    #: torch CPU threads while distilling (``--threads`` overrides). Null: the
    #: ``OMP_NUM_THREADS`` environment variable when set, else min(physical cores, CPUs
    #: this process may use, cgroup CPU quota); logged. More threads than cores (or than
    #: a shared machine grants) slowed the teacher 4-5x.
    threads: int | None = Field(default=None, ge=1)
    data: DataConfig
    prompt: PromptConfig = PromptConfig()
    teacher: TeacherConfig = TeacherConfig()
    labels: LabelConfig = LabelConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    layers: LayerConfig = LayerConfig()
    student: StudentConfig = StudentConfig()

    @model_validator(mode="after")
    def _chat_teacher(self) -> Recipe:
        if self.prompt.chat and (self.teacher.pool or self.layers.pooled):
            raise ValueError(
                "prompt.chat: true needs teacher.pool: false and no layers.pooled (the "
                "question-pooled state assumes a few-shot prefix)"
            )
        return self

    def format_prompt(self, prompt: str, tokenizer: Any = None) -> str:
        """The text the base model sees; chat recipes need the model's *tokenizer*."""
        if self.prompt.chat:
            from ssd_guard.answers import chat_prompt, question_of

            if tokenizer is None:
                raise ConfigError("a chat recipe formats prompts with the model's tokenizer")
            return chat_prompt(tokenizer, question_of(prompt), self.prompt.system)
        return self.prompt.few_shot + self.prompt.template.format(prompt=prompt)


def format_validation_error(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ""
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        lines.append(f"{source}: {loc or '<root>'}: {err['msg']}")
    return "\n".join(lines)


_R = TypeVar("_R", bound=RecipeFile)


def load_recipe_file(path: str | Path, model: type[_R]) -> _R:
    """Read a YAML recipe and validate it as ``model`` (errors: :class:`ConfigError`,
    one line per problem)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: recipe not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    try:
        recipe = model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(str(p), exc)) from exc
    recipe.source = str(p)
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    return load_recipe_file(path, Recipe)
