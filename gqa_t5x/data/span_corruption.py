"""T5's span-corruption pre-training objective as seqio preprocessors.

This follows `t5.data.preprocessors` (Raffel et al. 2020, section 3.1.4) step for step, so that
uptraining sees the same objective as the public T5.1.1 checkpoints did; the `t5` package itself
cannot be installed next to current seqio/tfds, so the few functions are kept here.

Pipeline for one task (`span_corruption`): tokenized documents ->
`select_random_chunk` (at most 65,536 tokens of each) -> `reduce_concat_tokens` (concatenate
128 documents) -> `split_tokens` (pieces of `tokens_length` tokens) -> `denoise`: a random span
mask covering `noise_density` of the tokens in spans of mean length `mean_noise_span_length`;
each noise span is replaced by one sentinel in the inputs, and the targets are the noise spans,
each after its sentinel. Sentinels are the vocabulary's extra ids, `vocab_size - 1` for the first
span and counting down (T5's `<extra_id_0>`, `<extra_id_1>`, ...).

`random_spans_helper` picks `tokens_length` so that the corrupted inputs plus EOS fill exactly the
inputs length: for inputs 512, noise density 0.15 and mean span 3 it gives 568 tokens and a
targets length of 114, the lengths of T5 pre-training.

Randomness is stateless: each mapped function takes seeds from `seqio.map_over_dataset`, which
draws them from seqio's per-task seed, so a task's data is reproducible given `seed`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import seqio
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


def random_spans_helper(
    inputs_length: int,
    noise_density: float,
    mean_noise_span_length: float,
    extra_tokens_per_span_inputs: int = 1,
    extra_tokens_per_span_targets: int = 1,
) -> tuple[int, int]:
    """Raw tokens per example, and the resulting targets length, for a given inputs length.

    The largest `tokens_length` whose corrupted inputs (non-noise tokens, one sentinel per span,
    one EOS) still fit `inputs_length`.

    Returns:
      (tokens_length, targets_length), e.g. (568, 114) for (512, 0.15, 3.0).
    """

    def lengths(tokens_length: int) -> tuple[int, int]:
        num_noise_tokens = int(round(tokens_length * noise_density))
        num_nonnoise_tokens = tokens_length - num_noise_tokens
        num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
        # Inputs: non-noise tokens, a sentinel per noise span, EOS. Targets: the reverse.
        return (
            num_nonnoise_tokens + num_noise_spans * extra_tokens_per_span_inputs + 1,
            num_noise_tokens + num_noise_spans * extra_tokens_per_span_targets + 1,
        )

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    # T5's adjustment so that targets match a (round) inputs length at noise density 0.5.
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def _random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor, seed: tf.Tensor):
    """Splits `num_items` into `num_segments` random positive lengths. Returns [num_segments]."""
    first_in_segment = tf.pad(
        seqio.stateless_shuffle(
            tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32), seed
        ),
        [[1, 0]],
    )
    segment_id = tf.cumsum(first_in_segment)
    return tf.math.segment_sum(tf.ones_like(segment_id), segment_id)


def random_spans_noise_mask(
    length: tf.Tensor,
    noise_density: float,
    seeds: tf.Tensor,
    mean_noise_span_length: float = 3.0,
) -> tf.Tensor:
    """T5's noise mask: alternating non-noise / noise spans, starting with non-noise.

    `round(length * noise_density)` noise tokens (at least 1, at most length - 1) in
    `round(num_noise_tokens / mean_noise_span_length)` spans (at least 1), span lengths drawn by
    random segmentation.

    Args:
      length: int32 scalar, number of tokens.
      noise_density: fraction of tokens that are noise.
      seeds: [2, 2] int32 stateless seeds (one for noise spans, one for non-noise spans).
      mean_noise_span_length: average noise span length.

    Returns:
      bool [length], True at noise tokens.
    """
    if noise_density == 0.0:
        return tf.zeros([length], tf.bool)
    orig_length = length
    length = tf.maximum(length, 2)  # avoid degeneracy
    num_noise_tokens = tf.cast(tf.round(tf.cast(length, tf.float32) * noise_density), tf.int32)
    num_noise_tokens = tf.minimum(tf.maximum(num_noise_tokens, 1), length - 1)
    num_noise_spans = tf.cast(
        tf.round(tf.cast(num_noise_tokens, tf.float32) / mean_noise_span_length), tf.int32
    )
    num_noise_spans = tf.maximum(num_noise_spans, 1)
    num_nonnoise_tokens = length - num_noise_tokens
    noise_span_lengths = _random_segmentation(num_noise_tokens, num_noise_spans, seeds[0])
    nonnoise_span_lengths = _random_segmentation(num_nonnoise_tokens, num_noise_spans, seeds[1])
    interleaved_span_lengths = tf.reshape(
        tf.stack([nonnoise_span_lengths, noise_span_lengths], axis=1), [num_noise_spans * 2]
    )
    span_starts = tf.cumsum(interleaved_span_lengths)[:-1]
    span_start_indicator = tf.math.unsorted_segment_sum(
        tf.ones_like(span_starts), span_starts, length
    )
    span_num = tf.cumsum(span_start_indicator)
    is_noise = tf.equal(span_num % 2, 1)
    return is_noise[:orig_length]


def sentinel_id(vocabulary: seqio.Vocabulary) -> int:
    """The first sentinel, `<extra_id_0>`: the vocabulary's last id."""
    return vocabulary.vocab_size - 1


def noise_span_to_unique_sentinel(
    tokens: tf.Tensor, noise_mask: tf.Tensor, vocabulary: seqio.Vocabulary
) -> tf.Tensor:
    """Replaces each noise span by one sentinel (first span -> vocab_size - 1, then down).

    Args:
      tokens: int [L]. noise_mask: bool [L].

    Returns:
      int [L - noise tokens + noise spans].
    """
    prev_token_is_noise = tf.pad(noise_mask[:-1], [[1, 0]])
    first_noise_tokens = tf.logical_and(noise_mask, tf.logical_not(prev_token_is_noise))
    subsequent_noise_tokens = tf.logical_and(noise_mask, prev_token_is_noise)
    sentinel = sentinel_id(vocabulary) + 1 - tf.cumsum(tf.cast(first_noise_tokens, tokens.dtype))
    tokens = tf.where(first_noise_tokens, sentinel, tokens)
    return tf.boolean_mask(tokens, tf.logical_not(subsequent_noise_tokens))


def nonnoise_span_to_unique_sentinel(
    tokens: tf.Tensor, noise_mask: tf.Tensor, vocabulary: seqio.Vocabulary
) -> tf.Tensor:
    """Replaces each non-noise span by one sentinel: the targets of span corruption."""
    return noise_span_to_unique_sentinel(tokens, tf.logical_not(noise_mask), vocabulary)


def select_random_chunk(
    dataset: tf.data.Dataset, max_length: int = 65536, feature_key: str = "targets"
) -> tf.data.Dataset:
    """Keeps one random chunk of at most `max_length` tokens of each non-empty example.

    The chunk is one of the `ceil(n / max_length)` aligned segments, uniformly. Other features
    are dropped.
    """

    @seqio.map_over_dataset(num_seeds=1)
    def chunk(x, seed):
        tokens = x[feature_key]
        n_tokens = tf.shape(tokens)[0]
        num_segments = tf.cast(
            tf.math.ceil(tf.cast(n_tokens, tf.float32) / tf.cast(max_length, tf.float32)),
            tf.int32,
        )
        start = max_length * tf.random.stateless_uniform(
            [], maxval=num_segments, dtype=tf.int32, seed=seed
        )
        end = tf.minimum(start + max_length, n_tokens)
        return {feature_key: tokens[start:end]}

    dataset = dataset.filter(lambda x: tf.not_equal(tf.size(x[feature_key]), 0))
    return chunk(dataset)


def reduce_concat_tokens(
    dataset: tf.data.Dataset, feature_key: str = "targets", batch_size: int = 128
) -> tf.data.Dataset:
    """Concatenates the tokens of `batch_size` consecutive examples (padding, id 0, removed)."""
    dataset = dataset.map(lambda x: {feature_key: x[feature_key]}, num_parallel_calls=AUTOTUNE)
    dataset = dataset.padded_batch(batch_size, padded_shapes={feature_key: [-1]})

    def concat(x):
        tokens = tf.reshape(x[feature_key], [-1])
        return {feature_key: tf.boolean_mask(tokens, tf.cast(tokens, tf.bool))}

    return dataset.map(concat, num_parallel_calls=AUTOTUNE)


def split_tokens(
    dataset: tf.data.Dataset, max_tokens_per_segment: int, feature_key: str = "targets"
) -> tf.data.Dataset:
    """Splits each example into consecutive pieces of `max_tokens_per_segment` tokens (the last
    one shorter). Empty examples are dropped."""

    def split(x):
        tokens = x[feature_key]
        n_tokens = tf.shape(tokens)[0]
        length = max_tokens_per_segment
        num_segments = tf.cast(
            tf.math.ceil(tf.cast(n_tokens, tf.float32) / float(length)), tf.int32
        )
        padding = num_segments * length - n_tokens
        padded = tf.pad(tokens, [[0, padding]])
        lengths = tf.concat([tf.repeat(length, num_segments - 1), [length - padding]], axis=0)
        return {feature_key: tf.reshape(padded, [-1, length])}, lengths

    def strip_padding(x, length):
        return {feature_key: x[feature_key][:length]}

    dataset = dataset.filter(lambda x: tf.not_equal(tf.size(x[feature_key]), 0))
    dataset = dataset.map(split, num_parallel_calls=AUTOTUNE)
    dataset = dataset.unbatch()
    return dataset.map(strip_padding, num_parallel_calls=AUTOTUNE)


def denoise(
    dataset: tf.data.Dataset,
    vocabulary: seqio.Vocabulary,
    noise_density: float,
    mean_noise_span_length: float,
) -> tf.data.Dataset:
    """Span-corrupts `targets` into {"inputs": with sentinels, "targets": the noise spans}.

    Seeds are split as T5 does (6 per example: mask, inputs, targets) so that the same seed gives
    T5's masks.
    """

    @seqio.map_over_dataset(num_seeds=1)
    def corrupt(x, seed):
        seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 6))
        tokens = x["targets"]
        noise_mask = random_spans_noise_mask(
            tf.size(tokens), noise_density, seeds[:2], mean_noise_span_length
        )
        return {
            "inputs": noise_span_to_unique_sentinel(tokens, noise_mask, vocabulary),
            "targets": nonnoise_span_to_unique_sentinel(tokens, noise_mask, vocabulary),
        }

    return corrupt(dataset)


def span_corruption(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int],
    output_features: Mapping[str, seqio.Feature],
    mean_noise_span_length: float = 3.0,
    noise_density: float = 0.15,
    merge_examples_to_reduce_padding: bool = True,
) -> tf.data.Dataset:
    """T5's span corruption, as a seqio preprocessor on tokenized `targets` (documents).

    Place after `seqio.preprocessors.tokenize` and before
    `seqio.preprocessors.append_eos_after_trim`.

    Raises:
      ValueError: if `sequence_length["targets"]` is shorter than the targets the inputs length
        implies (114 for 512 at T5's settings), or inputs and targets use different vocabularies.
    """
    inputs_length = sequence_length["inputs"]
    tokens_length, targets_length = random_spans_helper(
        inputs_length, noise_density, mean_noise_span_length
    )
    if sequence_length["targets"] < targets_length:
        raise ValueError(
            f"span_corruption: targets length {sequence_length['targets']} is shorter than "
            f"{targets_length}, which inputs length {inputs_length} needs at noise density "
            f"{noise_density} and mean span length {mean_noise_span_length}"
        )
    vocabulary = output_features["targets"].vocabulary
    if "inputs" in output_features and output_features["inputs"].vocabulary != vocabulary:
        raise ValueError(
            "span_corruption: inputs and targets must share one vocabulary (the inputs are made "
            "from the tokenized targets)"
        )
    ds = select_random_chunk(dataset, max_length=65536)
    if merge_examples_to_reduce_padding:
        ds = reduce_concat_tokens(ds, batch_size=128)
    ds = split_tokens(ds, max_tokens_per_segment=tokens_length)
    return denoise(ds, vocabulary, noise_density, mean_noise_span_length)


def span_corruption_preprocessor(mean_noise_span_length: float = 3.0, noise_density: float = 0.15):
    """`span_corruption` with its settings bound, for a seqio Task's preprocessor list."""
    return functools.partial(
        span_corruption,
        mean_noise_span_length=mean_noise_span_length,
        noise_density=noise_density,
    )


def targets_length_for(
    inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> int:
    """The targets length span corruption produces for `inputs_length` (114 for 512)."""
    return random_spans_helper(inputs_length, noise_density, mean_noise_span_length)[1]
