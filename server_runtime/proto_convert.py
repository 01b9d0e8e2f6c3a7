"""Conversions between generated proto messages and engine domain objects.

Servicers and worker clients call these; nothing else imports generated classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from core.pool_stats import PoolStats
from core.sampling import FinishReason, SamplingParams, TokenLogprob
from core.structured_output import GrammarKind, StructuredOutput
from core.ticket import Fingerprint, TransferTicket
from protos.pdserve.v1 import common_pb2, worker_pb2

DEFAULT_MAX_TOKENS = 16

FINISH_TO_PROTO = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}
FINISH_FROM_PROTO = {value: key for key, value in FINISH_TO_PROTO.items()}


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Fill unset fields with defaults; no validation here (the gateway validates)."""
    return SamplingParams(
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        top_k=msg.top_k if msg.HasField("top_k") else 0,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        repetition_penalty=(msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0),
        presence_penalty=msg.presence_penalty if msg.HasField("presence_penalty") else 0.0,
        frequency_penalty=msg.frequency_penalty if msg.HasField("frequency_penalty") else 0.0,
        min_p=msg.min_p if msg.HasField("min_p") else 0.0,
        min_tokens=msg.min_tokens if msg.HasField("min_tokens") else 0,
        logit_bias=tuple(sorted(msg.logit_bias.items())),
        include_stop_str_in_output=msg.include_stop_str_in_output,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        structured=structured_from_proto(msg.structured_output)
        if msg.HasField("structured_output")
        else None,
    )


def structured_from_proto(msg: common_pb2.StructuredOutput) -> StructuredOutput | None:
    """None when no kind is set (or ``json_object`` is false)."""
    kind = msg.WhichOneof("kind")
    if kind is None or (kind == "json_object" and not msg.json_object):
        return None
    grammar_kind = GrammarKind(kind)  # the oneof's field names are GrammarKind's values
    if grammar_kind is GrammarKind.JSON_OBJECT:
        return StructuredOutput(grammar_kind)
    if grammar_kind is GrammarKind.CHOICE:
        return StructuredOutput(grammar_kind, choices=tuple(msg.choice.choices))
    return StructuredOutput(grammar_kind, spec=getattr(msg, kind))


def structured_to_proto(constraint: StructuredOutput) -> common_pb2.StructuredOutput:
    msg = common_pb2.StructuredOutput()
    if constraint.kind is GrammarKind.JSON_OBJECT:
        msg.json_object = True
    elif constraint.kind is GrammarKind.CHOICE:
        msg.choice.choices.extend(constraint.choices)
    else:
        setattr(msg, constraint.kind.value, constraint.spec)
    return msg


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        logit_bias=dict(params.logit_bias),
        include_stop_str_in_output=params.include_stop_str_in_output,
    )
    if params.seed is not None:
        msg.seed = params.seed
    # neutral values stay unset: the default path's messages do not grow
    if params.repetition_penalty != 1.0:
        msg.repetition_penalty = params.repetition_penalty
    if params.presence_penalty != 0.0:
        msg.presence_penalty = params.presence_penalty
    if params.frequency_penalty != 0.0:
        msg.frequency_penalty = params.frequency_penalty
    if params.min_p != 0.0:
        msg.min_p = params.min_p
    if params.min_tokens:
        msg.min_tokens = params.min_tokens
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    if params.structured is not None:
        msg.structured_output.CopyFrom(structured_to_proto(params.structured))
    return msg


def logprob_to_proto(lp: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


def logprob_from_proto(msg: common_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(msg.token_id, msg.logprob, tuple((t.token_id, t.logprob) for t in msg.top))


def logprobs_to_proto(lps: Sequence[TokenLogprob]) -> list[common_pb2.TokenLogprob]:
    return [logprob_to_proto(lp) for lp in lps]


def logprobs_from_proto(msgs: Iterable[common_pb2.TokenLogprob]) -> tuple[TokenLogprob, ...]:
    return tuple(logprob_from_proto(m) for m in msgs)


def ticket_from_proto(msg: worker_pb2.TransferTicket) -> TransferTicket:
    fp = msg.fingerprint
    return TransferTicket(
        transfer_id=msg.transfer_id,
        kv_endpoint=msg.kv_endpoint,
        block_ids=tuple(msg.block_ids),
        lease_s=msg.lease_seconds,
        cached_blocks=msg.cached_blocks,
        fingerprint=Fingerprint(
            model=fp.model,
            dtype=fp.dtype,
            block_size=fp.block_size,
            num_layers=fp.num_layers,
            num_kv_heads=fp.num_kv_heads,
            head_dim=fp.head_dim,
            backend=fp.backend,
            integrity=fp.integrity,
            weights=fp.weights,
            layout=fp.layout,
            protocol_version=fp.protocol_version,
        ),
    )


def ticket_to_proto(ticket: TransferTicket) -> worker_pb2.TransferTicket:
    return worker_pb2.TransferTicket(
        transfer_id=ticket.transfer_id,
        kv_endpoint=ticket.kv_endpoint,
        block_ids=list(ticket.block_ids),
        lease_seconds=ticket.lease_s,
        cached_blocks=ticket.cached_blocks,
        fingerprint=worker_pb2.KVFingerprint(**ticket.fingerprint.to_fields()),
    )


def status_to_proto(
    tier: str,
    model: str,
    stats: PoolStats,
    block_size: int,
    pending_transfers: int,
    kv_endpoint: str = "",
) -> worker_pb2.WorkerStatus:
    return worker_pb2.WorkerStatus(
        tier=tier,
        model=model,
        total_blocks=stats.total_blocks,
        free_blocks=stats.free_blocks,
        block_size=block_size,
        running=stats.running,
        waiting=stats.waiting,
        pending_transfers=pending_transfers,
        pool_ok=stats.pool_ok,
        kv_endpoint=kv_endpoint,
    )
