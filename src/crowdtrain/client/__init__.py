"""crowdtrain.client: the volunteer side — probe the device, join a coordinator, move bytes.

`probe_device` says what this machine can train on; `CoordinatorApi` talks to the coordinator
(docs/API.md) through the retrying, resumable, size-bounded transfers of `transfer.py`;
`identity.py` keeps the volunteer's credentials and pins the signed run manifest, whose signing
side (`sign_manifest`, `load_or_create_signing_key`) the coordinator reuses. The protocol is
DiLoCo's (Douillard et al. 2023, arXiv:2311.08105).
"""

from crowdtrain.client.api import (
    ContributionMeta,
    CoordinatorApi,
    FinishedMsg,
    HeartbeatMsg,
    PeerBanned,
    ProtocolError,
    ReceiptMsg,
    RegisterMsg,
    VerificationReceiptMsg,
    VerifyOrderMsg,
    WaitMsg,
    WorkOrderMsg,
    WorkReply,
)
from crowdtrain.client.identity import (
    ClientState,
    ManifestError,
    VerifiedManifest,
    config_dir,
    forget_state,
    load_state,
    normalize_url,
    parse_manifest_doc,
    save_state,
    state_path,
    verify_manifest,
)
from crowdtrain.client.probe import DeviceInfo, probe_device
from crowdtrain.client.signing import (
    SigningKeyError,
    load_or_create_signing_key,
    manifest_hash,
    public_key_hex,
    sign_manifest,
    signature_is_valid,
)
from crowdtrain.client.transfer import (
    ApiError,
    ClientError,
    ManifestChanged,
    RetryPolicy,
    Stopped,
    TransferError,
    download_blob,
    request_json,
    upload_payload,
)

__all__ = [
    "ApiError",
    "ClientError",
    "ClientState",
    "ContributionMeta",
    "CoordinatorApi",
    "DeviceInfo",
    "FinishedMsg",
    "HeartbeatMsg",
    "ManifestChanged",
    "ManifestError",
    "PeerBanned",
    "ProtocolError",
    "ReceiptMsg",
    "RegisterMsg",
    "RetryPolicy",
    "SigningKeyError",
    "Stopped",
    "TransferError",
    "VerificationReceiptMsg",
    "VerifiedManifest",
    "VerifyOrderMsg",
    "WaitMsg",
    "WorkOrderMsg",
    "WorkReply",
    "config_dir",
    "download_blob",
    "forget_state",
    "load_or_create_signing_key",
    "load_state",
    "manifest_hash",
    "normalize_url",
    "parse_manifest_doc",
    "probe_device",
    "public_key_hex",
    "request_json",
    "save_state",
    "sign_manifest",
    "signature_is_valid",
    "state_path",
    "upload_payload",
    "verify_manifest",
]
