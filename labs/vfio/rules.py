"""Rule ids of the spec's conformance rules (sections 2.8 and 3.9), with one-line titles.

Test ids and report labels carry these ids; certification policy (labs.certify.policy)
decides how much each one weighs.
"""

from __future__ import annotations

V1_RULES: dict[str, str] = {
    "V1-R1": "migration region has TYPE cap (3,1), READ|WRITE, size >= 32 + data section",
    "V1-R2": "fields accessed only at native width and alignment; other accesses should fail",
    "V1-R3": "reserved reads 0 and ignores writes",
    "V1-R4": "device_state read-modify-write preserves reserved bits 3-31",
    "V1-R5": "after open device_state & 7 == 001 (RUNNING)",
    "V1-R6": "writing 101, 110 or 111 fails and leaves the state unchanged",
    "V1-R7": "a successful state write is complete on return: read-back gives the new value",
    "V1-R8": "after a failed state write the state reads as the prior state or 110 (ERROR)",
    "V1-R9": "in ERROR every state write fails; VFIO_DEVICE_RESET returns to 001",
    "V1-R10": "all documented flows succeed; 011 -> 010 succeeds with pending_bytes > 0",
    "V1-R11": "repeated pending_bytes reads without data_offset do not change the stream",
    "V1-R12": "a data_offset read stages a chunk; re-reads of data_offset/data_size are stable",
    "V1-R13": "a chunk is consumed only at the next pending_bytes read; window re-reads are stable",
    "V1-R14": "data_offset >= 32, page aligned when the window is mmappable",
    "V1-R15": "in 010 pending_bytes reaches 0 and no data is generated afterwards",
    "V1-R16": "resume: data_offset, chunk, data_size per chunk; replaying a source's chunks then 001 succeeds",
    "V1-R17": "corrupted or incomplete resume data fails data_size or the exit from 100",
    "V1-R18": "the user keeps chunk order and sizes (the agent writes the boundaries it read)",
    "V1-R19": "VFIO_DEVICE_RESET from any state leaves 001 and ends any session",
}

V2_RULES: dict[str, str] = {
    "V2-R1": "GET MIGRATION returns flags including STOP_COPY, in {1,3,5,7}; ENOTTY without migration",
    "V2-R2": "VFIO_DEVICE_FEATURE header validation returns EINVAL",
    "V2-R3": "a freshly opened device is RUNNING with data_fd -1",
    "V2-R4": "SET to >= 8, ERROR or an unadvertised state fails EINVAL, state unchanged",
    "V2-R5": "SET to the current state succeeds with data_fd -1 and no side effect",
    "V2-R6": "every supported (cur, target) pair succeeds along the kernel's path",
    "V2-R7": "data_fd is returned iff the last arc opens a session",
    "V2-R8": "the saving fd stays valid across the saving group: one continuous stream",
    "V2-R9": "in STOP_COPY read() reaches 0 and keeps returning 0, never ENOMSG",
    "V2-R10": "an exhausted PRE_COPY read returns ENOMSG (spec) or 0 (the sample mdev)",
    "V2-R11": "PRECOPY_INFO only in PRE_COPY states, argsz >= 24; initial_bytes shrinks as data is read",
    "V2-R12": "STOP_COPY -> PRE_COPY(_P2P) fails EINVAL, state unchanged (kernels without FIX-2026 hang)",
    "V2-R13": "save -> resume round trip with arbitrary write sizes gives an equivalent device",
    "V2-R14": "a truncated or corrupted stream fails the exit from RESUMING, never RUNNING",
    "V2-R15": "from ERROR every SET fails EINVAL; RESET returns to RUNNING",
    "V2-R16": "after RESET or the end of a session, I/O on the old data_fd fails",
    "V2-R17": "after a failed SET the buffer has data_fd -1; the state is read back with GET",
    "V2-R18": "data_fd is close-on-exec and a non-seekable stream",
    "V2-R19": "MIG_DATA_SIZE succeeds in every state",
    "V2-R20": "DMA logging follows the START/REPORT rules (ENOTTY without log_ops)",
}

RULES: dict[str, str] = {**V1_RULES, **V2_RULES}


def rule_title(rule: str) -> str:
    return RULES[rule]


def label(rule: str) -> str:
    """'V2-R9: in STOP_COPY read() reaches 0 ...' for reports."""
    return f"{rule}: {RULES[rule]}"
