"""Why a delivery was refused or rolled back: one stable code per cause (docs/delivery.md § Reason codes)."""

from __future__ import annotations

from enum import StrEnum

from agent.errors import LeptonError


class Reason(StrEnum):
    """The `reason` field of a `failed` or `rolled_back` deployment state."""

    # The manifest, in the order the checks run.
    BAD_MANIFEST = "bad_manifest"
    """Not a JSON object, not UTF-8, too big, too deep, duplicate keys, or a field fails validation."""
    UNSIGNED = "unsigned"
    """No `signature` or no `key_id`."""
    UNTRUSTED_KEY = "untrusted_key"
    """`key_id` is not among the config's trusted keys."""
    BAD_SIGNATURE = "bad_signature"
    """The signature does not verify over the canonical manifest with that key."""
    EXPIRED = "expired"
    """`delivery.expires` is in the past."""
    INCOMPATIBLE = "incompatible"
    """`runtime` constraints exclude this backend, board or agent version."""
    NOT_NEWER = "not_newer"
    """The version is not newer than the active one and this is not an explicit rollback."""
    TOO_LARGE = "too_large"
    """The declared size is over the profile's cap."""
    WRONG_MODEL = "wrong_model"
    """The manifest names another model or version than the one asked for."""
    # The payload.
    SIZE_MISMATCH = "size_mismatch"
    """A chunk is longer or shorter than the manifest says, or the bytes add up to more than `size`."""
    HASH_MISMATCH = "hash_mismatch"
    """A chunk, or the whole file, does not hash to what the signed manifest says."""
    NOT_FOUND = "not_found"
    """No manifest or chunk arrived for that name@version in time."""
    STORAGE = "storage"
    """The model store could not write (disk full, permissions)."""
    NOT_KEPT = "not_kept"
    """A rollback asked for a version this device does not keep."""
    # Activation.
    MEMORY_BUDGET = "memory_budget"
    """The model's tensors (bounded from the file, before loading) would not fit the profile's memory budget."""
    SELFTEST_TIMEOUT = "selftest_timeout"
    """Loading and the sample inferences took longer than the self-test's time budget."""
    SELFTEST_CRASHED = "selftest_crashed"
    """The agent died (out of memory, killed, crashed) while self-testing this model; it is not tried again."""
    LOAD_FAILED = "load_failed"
    """The runtime refuses the file (corrupt, unsupported op)."""
    INPUT_SHAPE = "input_shape"
    """Input tensors do not fit the pipeline (shape or dtype)."""
    OUTPUT_SHAPE = "output_shape"
    """Output tensors do not fit the pipeline."""
    TASK_MISMATCH = "task_mismatch"
    """The task cannot be built for the model (e.g. labels do not match the outputs)."""
    INVOKE_FAILED = "invoke_failed"
    """The sample inference raised."""
    LATENCY_BUDGET = "latency_budget"
    """The sample inference is slower than the profile's budget."""
    SWAP_FAILED = "swap_failed"
    """The pipeline refused the new model."""
    PIPELINE_CRASHED = "pipeline_crashed"
    """The pipeline restarted or reported an error during the probation window."""
    PIPELINE_STALLED = "pipeline_stalled"
    """The pipeline produced nothing for too long during the probation window."""
    RESTARTED_IN_PROBATION = "restarted_in_probation"
    """The agent restarted before the probation window passed; the trial is not trusted."""
    SHADOW_AGREEMENT = "shadow_agreement"
    """In a shadow trial the new model agreed with the active one less often than required."""
    SHADOW_LATENCY = "shadow_latency"
    """In a shadow trial the new model was slower than allowed."""
    QUEUE_FULL = "queue_full"
    """The device has as many deployments pending as it accepts; the deploy was not queued."""
    STOPPED = "stopped"
    """The agent is shutting down; the download resumes at the next start."""


class DeliveryError(LeptonError):
    """A delivery step refused: carries the reason code and one line saying what exactly."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
