"""Synthetic strategy tasks, generated on device from a PRNG key (DESIGN.md §9).

Each task hides ``S`` strategies ``s ∈ {0..S-1}``. An example is a prompt ``x``
(``P`` tokens) and a target ``y* = f_s(x)`` for a uniformly drawn ``s``; the
model never sees ``s``. Every example also carries all ``S`` valid outputs
``(f_0(x), .., f_{S-1}(x))`` and the index ``s``, for evaluation only.

Token conventions (``latentdiv.vocab``): the alphabet of ``A`` content symbols
``a ∈ {0..A-1}`` is written as token ``FIRST_CONTENT + a``, so
``vocab_size = NUM_RESERVED + A``. A target row has ``T`` positions: content
tokens, then one ``EOS``, then ``PAD`` up to ``T`` (``T`` counts the EOS).
``target_mask`` is True on the content tokens and the EOS (the scored
positions). Prompts are content tokens; only ``transduction`` pads prompts
(variable input length), with PAD at the end.

Sampling is a pure function of the key: ``task.sample(key, batch_size)`` is
jittable (``batch_size`` static), so a train step can draw its own batch on
device, ``batch = task.sample(jax.random.fold_in(data_key, step), B)``, and the
data order is exactly reproducible on resume. Example ``b`` of a batch is drawn
from ``jax.random.split(key, B)[b]``, so it depends on ``B`` too.

Tasks (``make_task(name, **kwargs)``):

* ``early_divergence`` — ``f_s(x)_t = (x_t + s·δ) mod A`` for ``t = 1..P``
  (``T = P + 1``). Strategies differ at every position, the first included,
  for every x: ``(s − s')·δ ≢ 0 (mod A)`` for ``s ≠ s'`` is checked at
  construction.
* ``late_divergence`` — ``f_s(x) = (x_1..x_P, u_s(x))`` with a suffix ``u_s``
  of ``d`` tokens (``T = P + d + 1``): all strategies copy x on the first
  ``P = T − 1 − d`` positions and differ only in the last ``d`` content tokens.
  ``variant="shift"``: ``u_s(x)_j = (x_j + s·δ) mod A`` (distinct at every
  suffix position, checked as above). ``variant="permute"``: the first ``d``
  prompt symbols are drawn distinct and ``u_s(x)_j = x_{((j + s) mod d)}`` (a
  rotation; ``S ≤ d ≤ A`` is checked), so strategies differ at every suffix
  position, for every x the suffixes of all strategies are permutations of
  one another (the same tokens in a different order), and the per-position
  token marginal over x is uniform for every strategy: strategies differ only
  in their trajectories, the case where the teacher-forced token proxy is
  expected to fall short (DESIGN.md §9).
* ``transduction`` — one strategy (``S = 1``), a reference with partial credit
  (for RAML's edit-distance reward, DESIGN.md §8): the input length
  ``n ~ U{min_len..P}`` varies, the prompt is ``x_1..x_n`` then PAD, and
  ``y* = g(x_1..x_n)`` then EOS then PAD (``T = P + 1``), with ``g`` one of
  ``"reverse"`` (``x_n..x_1``), ``"copy"`` (``x_1..x_n``) and ``"dedup"``
  (consecutive repeats collapsed: ``a a b a → a b a``, length ≤ n).
* ``pattern_placement`` — strategy s writes s fillers, the prompt (the shared
  pattern), then S − 1 − s fillers (``T = P + S``): strategies that differ only
  in where a shared pattern is placed, so teacher forcing on the data sees the
  latents agree once the pattern has started (DESIGN.md §9).
* ``branch`` — two strategies that announce themselves with their first
  token and differ in how hard the rest is (DESIGN.md §6.4, §9): ``f_0(x) =
  (b_0, x_1..x_P)`` (a copy) and ``f_1(x) = (b_1, g(x))`` with
  ``g(x)_t = x_{(x_t mod P) + 1}`` (``"lookup"``: each token points at the
  prompt position to read, two dependent attention steps), ``T = P + 2``.
  A small one-layer student copies but does not look up (``A = 8, P = 6``),
  so a distilled student should avoid the first token ``b_1`` that leads there.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

from latentdiv import vocab

TASKS = ("early_divergence", "late_divergence", "transduction", "pattern_placement",
         "branch")
LATE_VARIANTS = ("shift", "permute")
TRANSFORMS = ("reverse", "copy", "dedup")
HARD_BRANCHES = ("lookup",)


class Batch(NamedTuple):
  """A batch of examples (every field is a device array).

  Attributes:
    prompt: [B, P] int32 prompts x (content tokens; PAD only at the end of a
      ``transduction`` prompt).
    target: [B, T] int32 targets y* = f_s(x): content, EOS, then PAD.
    target_mask: [B, T] bool, True on the content tokens and the EOS.
    strategy: [B] int32 hidden strategy s of the target (never fed to the model).
    valid_outputs: [B, S, T] int32, row s is f_s(x) (evaluation only).
  """

  prompt: jax.Array
  target: jax.Array
  target_mask: jax.Array
  strategy: jax.Array
  valid_outputs: jax.Array


@dataclasses.dataclass(frozen=True)
class Task:
  """A synthetic task: static sizes plus the pure functions that generate it.

  Hashable and compared by ``(name, sizes, options)`` (the functions follow
  from those), so it can be closed over or passed as a static argument of jit.

  Attributes:
    name: one of ``TASKS``.
    vocab_size: V = NUM_RESERVED + alphabet_size.
    alphabet_size: A, the number of content symbols.
    prompt_len: P.
    target_len: T, the output length including the EOS.
    num_strategies: S.
    options: the task-specific settings, as sorted ``(name, value)`` pairs.
    prompt_fn: key -> [P] int32 prompt.
    outputs_fn: [P] prompt -> [S, T] int32 valid outputs.
    tokenizer: a text task's tokenizer (``latentdiv.text_data``; ``encode``
      and ``decode`` between strings and ids); None for synthetic tasks.
  """

  name: str
  vocab_size: int
  alphabet_size: int
  prompt_len: int
  target_len: int
  num_strategies: int
  options: tuple[tuple[str, Any], ...]
  prompt_fn: Callable[[jax.Array], jax.Array] = dataclasses.field(
      compare=False, repr=False)
  outputs_fn: Callable[[jax.Array], jax.Array] = dataclasses.field(
      compare=False, repr=False)
  tokenizer: Any = dataclasses.field(default=None, compare=False, repr=False)

  def outputs(self, prompt_P: jax.Array) -> jax.Array:
    """The S valid outputs ``(f_0(x), .., f_{S-1}(x))`` of one prompt.

    Args:
      prompt_P: [P] int prompt (content tokens, PAD-padded for transduction).

    Returns:
      [S, T] int32, row s = f_s(x), EOS then PAD after its content.
    """
    chex.assert_shape(prompt_P, (self.prompt_len,),
                      custom_message="prompt must be [prompt_len]")
    return self.outputs_fn(jnp.asarray(prompt_P, jnp.int32))

  def sample_one(self, key: chex.PRNGKey) -> Batch:
    """One example (a ``Batch`` without the leading batch axis).

    ``x = prompt_fn(k_x)``, ``s ~ U{0..S-1}`` from ``k_s``, ``y* = f_s(x)``,
    with ``k_x, k_s = split(key)``.
    """
    key_prompt, key_strategy = jax.random.split(key)
    prompt = self.prompt_fn(key_prompt)
    outputs = self.outputs_fn(prompt)
    strategy = jax.random.randint(key_strategy, (), 0, self.num_strategies, jnp.int32)
    target = outputs[strategy]
    return Batch(prompt=prompt, target=target, target_mask=target != vocab.PAD,
                 strategy=strategy, valid_outputs=outputs)

  def sample(self, key: chex.PRNGKey, batch_size: int) -> Batch:
    """A batch of ``batch_size`` examples, a pure function of ``key``.

    Example b is ``sample_one(split(key, batch_size)[b])``. Jittable with
    ``batch_size`` static.

    Args:
      key: a PRNG key (e.g. ``fold_in(data_key, step)``).
      batch_size: B (a Python int).

    Returns:
      A ``Batch`` with prompt [B, P], target [B, T], target_mask [B, T],
      strategy [B], valid_outputs [B, S, T].

    References:
      DESIGN.md §9.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    return jax.vmap(self.sample_one)(jax.random.split(key, batch_size))


# ----------------------------------------------------------------- helpers


def _content(symbols: jax.Array) -> jax.Array:
  """Symbols a ∈ {0..A-1} -> tokens FIRST_CONTENT + a (int32)."""
  return (symbols + vocab.FIRST_CONTENT).astype(jnp.int32)


def _symbols(tokens: jax.Array) -> jax.Array:
  """Content tokens -> symbols a = token − FIRST_CONTENT."""
  return tokens - vocab.FIRST_CONTENT


def _append_eos(content_SxN: jax.Array) -> jax.Array:
  """[S, N] content rows (all valid) -> [S, N+1] rows ending with EOS."""
  eos = jnp.full((content_SxN.shape[0], 1), vocab.EOS, jnp.int32)
  return jnp.concatenate([content_SxN.astype(jnp.int32), eos], axis=1)


def _uniform_prompt(key: chex.PRNGKey, prompt_len: int, alphabet_size: int) -> jax.Array:
  """[P] iid uniform content tokens."""
  return _content(jax.random.randint(key, (prompt_len,), 0, alphabet_size))


def _check_positive(**values: int) -> None:
  for name, value in values.items():
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}.")


def _check_shifts_distinct(num_strategies: int, shift: int, alphabet_size: int) -> None:
  """Raises unless s·δ mod A is distinct for s = 0..S-1."""
  offsets = [(s * shift) % alphabet_size for s in range(num_strategies)]
  if len(set(offsets)) != num_strategies:
    raise ValueError(
        f"shift={shift} with alphabet_size={alphabet_size} gives colliding "
        f"strategies (offsets s*shift mod A = {offsets} for num_strategies="
        f"{num_strategies}); choose a shift that makes them distinct.")


def _shifted(symbols_N: jax.Array, num_strategies: int, shift: int,
             alphabet_size: int) -> jax.Array:
  """[S, N] rows (a_t + s·δ) mod A, as symbols."""
  offsets = jnp.arange(num_strategies)[:, None] * shift
  return (symbols_N[None, :] + offsets) % alphabet_size


def _make(name, alphabet_size, prompt_len, target_len, num_strategies, options,
          prompt_fn, outputs_fn) -> Task:
  return Task(name=name, vocab_size=vocab.NUM_RESERVED + alphabet_size,
              alphabet_size=alphabet_size, prompt_len=prompt_len,
              target_len=target_len, num_strategies=num_strategies,
              options=tuple(sorted(options.items())), prompt_fn=prompt_fn,
              outputs_fn=outputs_fn)


# ------------------------------------------------------------------- tasks


def early_divergence(alphabet_size: int = 8, prompt_len: int = 5,
                     num_strategies: int = 3, shift: int = 1) -> Task:
  """Strategies that differ from the first output token.

  ``f_s(x)_t = (x_t + s·δ) mod A`` for t = 1..P, then EOS (T = P + 1).

  Args:
    alphabet_size: A, content symbols (V = 3 + A).
    prompt_len: P, also the number of content tokens of every output.
    num_strategies: S.
    shift: δ; ``s·δ mod A`` must be distinct over s (so every pair of valid
      outputs differs at every position, the first included).

  Returns:
    The ``Task``.

  References:
    DESIGN.md §9 (early divergence).
  """
  _check_positive(alphabet_size=alphabet_size, prompt_len=prompt_len,
                  num_strategies=num_strategies)
  _check_shifts_distinct(num_strategies, shift, alphabet_size)

  def outputs_fn(prompt_P):
    rows = _shifted(_symbols(prompt_P), num_strategies, shift, alphabet_size)
    return _append_eos(_content(rows))

  return _make("early_divergence", alphabet_size, prompt_len, prompt_len + 1,
               num_strategies, dict(shift=shift),
               functools.partial(_uniform_prompt, prompt_len=prompt_len,
                                 alphabet_size=alphabet_size),
               outputs_fn)


def late_divergence(alphabet_size: int = 8, prompt_len: int = 6,
                    num_divergent: int = 3, num_strategies: int = 3,
                    variant: str = "shift", shift: int = 1) -> Task:
  """Strategies that share a copy of x and differ only in the last d tokens.

  ``f_s(x) = (x_1..x_P, u_s(x)_1..u_s(x)_d, EOS)`` (T = P + d + 1), with

  * ``"shift"``: ``u_s(x)_j = (x_j + s·δ) mod A``;
  * ``"permute"``: ``u_s(x)_j = x_{((j−1+s) mod d)+1}``, with x_1..x_d drawn
    distinct: the suffixes are rotations of one another (same tokens, other
    order) and each position's marginal over x is uniform for every s.

  Args:
    alphabet_size: A (V = 3 + A).
    prompt_len: P, the length of the shared prefix.
    num_divergent: d ≤ P, the number of trailing content tokens that differ.
    num_strategies: S (``"permute"`` needs S ≤ d ≤ A).
    variant: one of ``LATE_VARIANTS``.
    shift: δ of ``"shift"`` (``s·δ mod A`` distinct over s); unused by
      ``"permute"``.

  Returns:
    The ``Task``: the first P output tokens agree across strategies and every
    pair of strategies differs at every one of the last d content positions.

  References:
    DESIGN.md §9 (late divergence: "similar tokens, different
    trajectories").
  """
  _check_positive(alphabet_size=alphabet_size, prompt_len=prompt_len,
                  num_divergent=num_divergent, num_strategies=num_strategies)
  if variant not in LATE_VARIANTS:
    raise ValueError(f"variant must be one of {LATE_VARIANTS}, got {variant!r}.")
  if num_divergent > prompt_len:
    raise ValueError(f"num_divergent={num_divergent} must be <= prompt_len={prompt_len}.")
  d = num_divergent
  if variant == "shift":
    _check_shifts_distinct(num_strategies, shift, alphabet_size)

    def prompt_fn(key):
      return _uniform_prompt(key, prompt_len, alphabet_size)

    def suffix_fn(symbols_P):
      return _shifted(symbols_P[:d], num_strategies, shift, alphabet_size)

    options = dict(num_divergent=d, variant=variant, shift=shift)
  else:
    if not num_strategies <= d <= alphabet_size:
      raise ValueError(
          "variant='permute' needs num_strategies <= num_divergent <= alphabet_size, "
          f"got {num_strategies}, {d}, {alphabet_size}.")

    def prompt_fn(key):
      key_head, key_tail = jax.random.split(key)
      head = jax.random.permutation(key_head, alphabet_size)[:d]
      tail = jax.random.randint(key_tail, (prompt_len - d,), 0, alphabet_size)
      return _content(jnp.concatenate([head, tail]))

    def suffix_fn(symbols_P):
      index = (jnp.arange(d)[None, :] + jnp.arange(num_strategies)[:, None]) % d
      return symbols_P[index]

    options = dict(num_divergent=d, variant=variant)

  def outputs_fn(prompt_P):
    symbols = _symbols(prompt_P)
    prefix = jnp.broadcast_to(symbols[None, :], (num_strategies, prompt_len))
    rows = jnp.concatenate([prefix, suffix_fn(symbols)], axis=1)
    return _append_eos(_content(rows))

  return _make("late_divergence", alphabet_size, prompt_len, prompt_len + d + 1,
               num_strategies, options, prompt_fn, outputs_fn)


def transduction(alphabet_size: int = 8, prompt_len: int = 6, min_len: int = 2,
                 transform: str = "reverse") -> Task:
  """A reference transduction with variable lengths, for RAML (one strategy).

  ``n ~ U{min_len..P}``; prompt ``(x_1..x_n, PAD..)``; target
  ``(g(x_1..x_n), EOS, PAD..)`` of length T = P + 1, with ``g`` =
  ``"reverse"``: x_n..x_1; ``"copy"``: x_1..x_n; ``"dedup"``: x_1..x_n with
  each run of equal consecutive symbols collapsed to one.

  Args:
    alphabet_size: A (V = 3 + A).
    prompt_len: P, the longest input.
    min_len: the shortest input, 1 ≤ min_len ≤ P.
    transform: one of ``TRANSFORMS``.

  Returns:
    The ``Task`` (S = 1: ``valid_outputs[:, 0]`` is the reference).

  References:
    DESIGN.md §8–9 (rewarded transduction).
  """
  _check_positive(alphabet_size=alphabet_size, prompt_len=prompt_len, min_len=min_len)
  if transform not in TRANSFORMS:
    raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}.")
  if min_len > prompt_len:
    raise ValueError(f"min_len={min_len} must be <= prompt_len={prompt_len}.")
  target_len = prompt_len + 1

  def prompt_fn(key):
    positions = jnp.arange(prompt_len)
    key_len, key_tokens = jax.random.split(key)
    length = jax.random.randint(key_len, (), min_len, prompt_len + 1)
    tokens = _uniform_prompt(key_tokens, prompt_len, alphabet_size)
    return jnp.where(positions < length, tokens, vocab.PAD).astype(jnp.int32)

  def outputs_fn(prompt_P):
    positions = jnp.arange(prompt_len)
    present = prompt_P != vocab.PAD
    length = present.sum()
    if transform == "copy":
      keep, source = present, positions
    elif transform == "reverse":
      keep, source = present, jnp.clip(length - 1 - positions, 0, prompt_len - 1)
    else:  # dedup
      previous = jnp.concatenate([jnp.full((1,), vocab.PAD, prompt_P.dtype), prompt_P[:-1]])
      keep, source = present & (prompt_P != previous), positions
    # Write the kept tokens, in order, to the front of the row (a stable
    # compaction); for "reverse" the token read at slot t is x_{n-t}.
    slot = jnp.where(keep, jnp.cumsum(keep) - 1, target_len)
    row = jnp.full((target_len,), vocab.PAD, jnp.int32)
    row = row.at[slot].set(prompt_P[source].astype(jnp.int32), mode="drop")
    row = row.at[keep.sum()].set(vocab.EOS)
    return row[None, :]

  return _make("transduction", alphabet_size, prompt_len, target_len, 1,
               dict(min_len=min_len, transform=transform), prompt_fn, outputs_fn)


def pattern_placement(alphabet_size: int = 6, prompt_len: int = 4,
                      num_strategies: int = 3) -> Task:
  """Strategies that write the same pattern at different offsets.

  Symbol 0 is a filler that prompts never use (prompt symbols are uniform in
  ``1..A−1``); strategy s writes ``s`` fillers, the prompt ``x_1..x_P`` (the
  shared pattern), then ``S − 1 − s`` fillers and EOS (T = P + S). The
  strategies differ only in where the pattern is placed: under teacher
  forcing on data the offset is revealed as soon as the pattern starts, after
  which a latent that copies the prompt agrees with every other one, while
  free-running latents write the pattern at their own offset throughout
  (DESIGN.md §9).

  Args:
    alphabet_size: A ≥ 2 (symbol 0 is the filler).
    prompt_len: P.
    num_strategies: S, the number of offsets.

  Returns:
    The ``Task``.

  References:
    DESIGN.md §9 (strategies that teacher forcing cannot tell apart).
  """
  _check_positive(alphabet_size=alphabet_size, prompt_len=prompt_len,
                  num_strategies=num_strategies)
  if alphabet_size < 2:
    raise ValueError(f"alphabet_size must be >= 2 (symbol 0 is the filler), got "
                     f"{alphabet_size}.")
  width = prompt_len + num_strategies - 1

  def prompt_fn(key):
    return _content(jax.random.randint(key, (prompt_len,), 1, alphabet_size))

  def outputs_fn(prompt_P):
    position = jnp.arange(width)[None, :] - jnp.arange(num_strategies)[:, None]  # t − s
    inside = (position >= 0) & (position < prompt_len)
    pattern = prompt_P[jnp.clip(position, 0, prompt_len - 1)]
    rows = jnp.where(inside, pattern, _content(jnp.zeros((), jnp.int32)))
    return _append_eos(rows)

  return _make("pattern_placement", alphabet_size, prompt_len, width + 1, num_strategies,
               {}, prompt_fn, outputs_fn)
def branch(alphabet_size: int = 6, prompt_len: int = 4, hard_branch: str = "lookup") -> Task:
  """A first token that commits to an easy or a hard continuation (two strategies).

  ``f_0(x) = (b_0, x_1..x_P, EOS)`` and ``f_1(x) = (b_1, g(x), EOS)``, with
  the branch tokens ``b_s`` = symbol s and, for ``hard_branch="lookup"``,
  ``g(x)_t = x_{(x_t mod P) + 1}``: the token at the prompt position that
  ``x_t`` names. Copying needs one attention step (by position); the lookup
  needs two dependent ones (read ``x_t``, then attend to the position it
  names). At A = 8, P = 6 a one-layer d_model = 32 Transformer learns the
  copy but not the lookup (at A = 6, P = 4 it memorises it). A teacher trained
  on the uniform mixture starts either branch with probability ½; the
  per-token reward matches that first token, while the sequence reverse KL
  of a student that cannot follow the hard branch is lowest when it avoids
  ``b_1`` (DESIGN.md §6.4).

  Args:
    alphabet_size: A ≥ 2 (V = 3 + A); symbols 0 and 1 double as branch tokens.
    prompt_len: P (T = P + 2: branch token, P content tokens, EOS).
    hard_branch: one of ``HARD_BRANCHES``.

  Returns:
    The ``Task`` (S = 2; strategy 0 is the copy, 1 the hard branch).

  References:
    DESIGN.md §6.4 (a task where the future matters), §9.
  """
  _check_positive(alphabet_size=alphabet_size, prompt_len=prompt_len)
  if alphabet_size < 2:
    raise ValueError(f"alphabet_size must be >= 2 (two branch tokens), got {alphabet_size}.")
  if hard_branch not in HARD_BRANCHES:
    raise ValueError(f"hard_branch must be one of {HARD_BRANCHES}, got {hard_branch!r}.")

  def outputs_fn(prompt_P):
    symbols = _symbols(prompt_P)
    hard = symbols[symbols % prompt_len]
    rows = jnp.stack([jnp.concatenate([jnp.zeros((1,), symbols.dtype), symbols]),
                      jnp.concatenate([jnp.ones((1,), symbols.dtype), hard])])
    return _append_eos(_content(rows))

  return _make("branch", alphabet_size, prompt_len, prompt_len + 2, 2,
               dict(hard_branch=hard_branch),
               functools.partial(_uniform_prompt, prompt_len=prompt_len,
                                 alphabet_size=alphabet_size),
               outputs_fn)


_FACTORIES = {
    "early_divergence": early_divergence,
    "late_divergence": late_divergence,
    "transduction": transduction,
    "pattern_placement": pattern_placement,
    "branch": branch,
}


def make_task(name: str, **kwargs) -> Task:
  """The task ``name`` (one of ``TASKS``) built with ``kwargs``.

  Args:
    name: one of ``TASKS``.
    **kwargs: the keyword arguments of the corresponding factory function.

  Returns:
    The ``Task``.

  Raises:
    ValueError: for an unknown name or inconsistent sizes.
  """
  if name not in _FACTORIES:
    raise ValueError(f"Unknown task {name!r}; allowed: {TASKS}.")
  return _FACTORIES[name](**kwargs)


def from_config(task_config) -> Task:
  """The task of a config's ``task`` section: ``make_task(name, **fields)``.

  Each factory takes the fields of the section that name its keyword
  arguments (``inspect.signature``), so adding a task is its factory here,
  its entry in ``_FACTORIES`` and its fields in ``config.loop_config``.

  Raises:
    ValueError: unknown name or inconsistent fields, prefixed with
      ``config.task``.
  """
  name = task_config.name
  if name not in _FACTORIES:
    raise ValueError(f"config.task.name must be one of {TASKS}, got {name!r}.")
  accepted = inspect.signature(_FACTORIES[name]).parameters
  kwargs = {k: task_config[k] for k in accepted if k in task_config}
  try:
    return make_task(name, **kwargs)
  except ValueError as err:
    raise ValueError(f"config.task is inconsistent: {err}") from err
