"""Delta checkpoints: an Orbax ``CheckpointManager`` with one step per finished unit of work, plus a
top-level JSON metadata file. The on-disk layout::

    OUT/
      prinmix_delta.json         top-level metadata; written last, its presence marks a complete delta
      hf/                        config.json and tokenizer files of the fine-tuned checkpoint (for apply)
      steps/                     orbax.checkpoint.CheckpointManager directory
        metadata/                root metadata: the run identity (used to decide whether a resume is valid)
        0/                       step 0: the globals (embed_tokens, final norm, lm_head)
        1/ ... L/                step b+1: decoder block b
          arrays/                orbax PyTree (numpy leaves, OCDBT), only when the step stores any array:
                                   linears/<name>/<field>   compressed matrices (formats.to_state arrays)
                                   dense/<path...>          stored dense deltas (norms, biases, ...)
          meta/                  JSON (JsonSave): per entry its kind, to_state metadata, info, byte
                                   count and SHA-256 of every array; the base fingerprint of this step;
                                   ``meta_sha256``, the SHA-256 of the rest of this JSON (see meta_digest)

Per compressed matrix ``linears/<name>`` holds exactly the arrays of :func:`prinmix_jax.formats.to_state`:
for :class:`~prinmix_jax.formats.SVDQuantDelta` ``sigma_<b>``, ``v_codes_<b>``, ``v_scale_<b>``,
``v_zero_<b>``, ``u_codes_<b>``, ``u_scale_<b>``, ``u_zero_<b>`` per width ``b`` and ``widths`` (with lean
index metadata, format version 3, not the implied ones: :meth:`~prinmix_jax.formats.SVDQuantDelta.stored_fields`); for
:class:`~prinmix_jax.formats.LowRankDelta` ``us``, ``v``; for :class:`~prinmix_jax.formats.SignDelta`
``signs``, ``scale``. Zero-size arrays (Orbax refuses them) are kept out of the tree and recorded in the
entry's ``empty`` metadata. (There are no permutations to store: GPTQ's act-order permutation is undone
before packing, so the codes are in natural order.)

Multi-host writes: every array leaf is an :class:`OwnedArray` naming the process that holds it (the
process that compressed the matrix); in a ``jax.distributed`` run each process writes the arrays it owns
into its own ``ocdbt.process_<i>`` folder of the step and Orbax's primary process merges the OCDBT
manifests when it commits the step. The written tree is an ordinary numpy PyTree: any Orbax reader
(``ocp.StandardCheckpointer().restore(".../steps/3/arrays")``) opens it, with any number of processes.

Fingerprint of the base (format v1): for every step, SHA-256 over ``name\\0shape\\0`` and the float32
little-endian bytes of every base tensor of that step (HF names, sorted); the model fingerprint is SHA-256
of ``"prinmix-fingerprint-v1"`` and the step digests in step order. It is computed while streaming (no
extra pass), is independent of the storage dtype (bf16/f16 values are exact in float32) and lets ``apply``
refuse a wrong base block by block.
"""
from prinmix_jax.storage.format import (FORMAT, FORMAT_VERSION, HF_DIR, META_FILE, STEPS_DIR, WORK_SUFFIX, BlockDelta,
                                        DeltaFormatError, DenseEntry, FingerprintMismatchError, MatrixEntry, ZeroEntry, array_sha256,
                                        combine_fingerprint, decode_step, encode_step, meta_digest, tensor_digest,
                                        TensorDigest)
from prinmix_jax.storage.outputs import (OUTPUT_MARKER, check_output_location, file_sha256, is_prinmix_output, publish,
                                         write_json_atomic, write_output_marker, write_summary)
from prinmix_jax.storage.step_store import OwnedArray, StepStore, owned_tree
from prinmix_jax.storage.delta import DeltaCheckpoint, load_delta

__all__ = ["FORMAT", "FORMAT_VERSION", "META_FILE", "STEPS_DIR", "HF_DIR", "WORK_SUFFIX", "DeltaFormatError",
           "FingerprintMismatchError", "StepStore", "BlockDelta", "DeltaCheckpoint", "load_delta",
           "MatrixEntry", "ZeroEntry", "DenseEntry", "encode_step", "decode_step", "owned_tree", "OwnedArray",
           "tensor_digest", "TensorDigest", "combine_fingerprint", "meta_digest", "array_sha256", "file_sha256",
           "OUTPUT_MARKER", "is_prinmix_output", "write_output_marker", "check_output_location", "publish",
           "write_summary", "write_json_atomic"]
