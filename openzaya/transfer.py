"""The weight-transfer group between an RL trainer (rank 0) and inference servers (ranks 1..), joined the way vLLM's
NCCL weight-transfer engine joins, so the same trainer code pushes weights to `openzaya serve` and to vLLM.

Followed (vLLM source, the 0.30-0.34 line: `distributed/weight_transfer/nccl_engine.py` and `nccl_common.py`,
`distributed/utils.py` StatelessProcessGroup, `device_communicators/pynccl.py`). vLLM's init info names one of two
rendezvous modes:
- `nccl_unique_id_b64` (CUDA; what this trainer uses, vLLM's mode for trainers that do not run vLLM): the trainer
  draws an ncclUniqueId, sends its 128 bytes in standard base64, and every rank enters ncclCommInitRank at once
  (there is no store to wait on), then all-reduces a one-element zero tensor (PyNcclCommunicator's warm-up);
- `master_address` + `master_port`: rank 0 hosts a torch TCPStore (`use_libuv=False`) and the others connect. On
  CUDA rank 0 then sets the unique id under `broadcast_from/0/0`, pickled as vLLM's `ncclUniqueId`
  (StatelessProcessGroup.broadcast_obj; `unique_id_pickle` writes those bytes without importing vLLM, and
  `unique_id_from_pickle` reads them without it). On the CPU (openzaya serve on a CPU, and the tests) the group is
  gloo over that store, as vLLM's TorchDistTransport does on platforms without NCCL.
Each weight is then one broadcast from rank 0, in the order of the update's `names` (the engine's unpacked mode).
NCCL is reached through ctypes (`libnccl.so.2`, loaded by CUDA builds of torch) because the trainer cannot import
vLLM (it pins another torch). Simplified: unpacked broadcasts only (vLLM's `packed` mode batches small tensors).
NOTE: the NCCL path has not run here (no GPU on the machine this was written on; NCCL also refuses two ranks on one
GPU, so a trainer and a server need a GPU each). The gloo path is tested end to end (tests/test_rl_scale.py), the
pickled id against a stand-in of vLLM's class (tests/test_serve_rl.py).
"""

from __future__ import annotations

import ctypes
import io
import pickle
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

VLLM_UNIQUE_ID = ("vllm.distributed.device_communicators.pynccl_wrapper", "ncclUniqueId")
UNIQUE_ID_KEY = "broadcast_from/0/0"     # StatelessProcessGroup.broadcast_obj's first key from rank 0


# -----------------------------------------------------------------------------
# The NCCL unique id as vLLM pickles it


class NcclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]


def unique_id_pickle(raw: bytes) -> bytes:
    """The bytes `pickle.dumps` gives for vLLM's ncclUniqueId holding `raw`: `_ctypes._unpickle(cls, ({}, raw))`
    (a ctypes Structure's own reduction), with cls named by vLLM's module path."""
    def text(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()            # SHORT_BINUNICODE
    assert len(raw) == 128, len(raw)
    return (b"\x80\x04" + text("_ctypes") + text("_unpickle") + b"\x93"          # PROTO 4, STACK_GLOBAL
            + text(VLLM_UNIQUE_ID[0]) + text(VLLM_UNIQUE_ID[1]) + b"\x93"
            + b"}" + b"C" + bytes([len(raw)]) + raw + b"\x86\x86R.")            # ({}, raw), (cls, .), REDUCE


class _UniqueIdUnpickler(pickle.Unpickler):
    """Reads a pickled vLLM ncclUniqueId without vLLM: only `_ctypes._unpickle` and the id class are allowed."""

    def find_class(self, module, name):
        if (module, name) == VLLM_UNIQUE_ID:
            return NcclUniqueId
        if (module, name) == ("_ctypes", "_unpickle"):
            import _ctypes
            return _ctypes._unpickle
        raise pickle.UnpicklingError(f"{module}.{name} is not part of an NCCL unique id")


def unique_id_from_pickle(data: bytes) -> bytes:
    return bytes(_UniqueIdUnpickler(io.BytesIO(data)).load())


class _Nccl:
    """The five libnccl calls the transfer needs (ctypes; NCCL's C API)."""

    DTYPES = {torch.int8: 0, torch.uint8: 1, torch.int32: 2, torch.int64: 4, torch.float16: 6, torch.float32: 7,
              torch.float64: 8, torch.bfloat16: 9}

    def __init__(self):
        self.lib = ctypes.CDLL("libnccl.so.2")
        p = ctypes.c_void_p
        self.lib.ncclGetErrorString.restype = ctypes.c_char_p
        self.lib.ncclGetUniqueId.argtypes = [ctypes.POINTER(NcclUniqueId)]
        self.lib.ncclCommInitRank.argtypes = [ctypes.POINTER(p), ctypes.c_int, NcclUniqueId, ctypes.c_int]
        self.lib.ncclBroadcast.argtypes = [p, p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, p, p]
        self.lib.ncclAllReduce.argtypes = [p, p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, p, p]
        self.lib.ncclCommDestroy.argtypes = [p]

    def check(self, result: int):
        if result != 0:
            raise RuntimeError(f"NCCL error {result}: {self.lib.ncclGetErrorString(result).decode()}")

    def unique_id(self) -> bytes:
        uid = NcclUniqueId()
        self.check(self.lib.ncclGetUniqueId(ctypes.byref(uid)))
        return bytes(uid)

    def init_rank(self, world: int, raw: bytes, rank: int):
        comm = ctypes.c_void_p()
        self.check(self.lib.ncclCommInitRank(ctypes.byref(comm), world, NcclUniqueId.from_buffer_copy(raw), rank))
        return comm

    def broadcast(self, t: torch.Tensor, comm, root: int):
        stream = ctypes.c_void_p(torch.cuda.current_stream(t.device).cuda_stream)
        self.check(self.lib.ncclBroadcast(t.data_ptr(), t.data_ptr(), t.numel(), self.DTYPES[t.dtype], root, comm,
                                          stream))

    def all_reduce_sum(self, t: torch.Tensor, comm):
        stream = ctypes.c_void_p(torch.cuda.current_stream(t.device).cuda_stream)
        self.check(self.lib.ncclAllReduce(t.data_ptr(), t.data_ptr(), t.numel(), self.DTYPES[t.dtype], 0, comm,
                                          stream))


# -----------------------------------------------------------------------------
# The group


def listen_socket(host: str) -> socket.socket:
    """A listening socket on a free port of `host`, for rank 0's store (its port is what the servers are told)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen()
    return sock


def address_towards(url_host: str) -> str:
    """This machine's address on the route to `url_host` (what a server must dial to reach our store)."""
    probe = socket.socket(socket.AF_INET6 if ":" in url_host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((url_host, 9))
        return probe.getsockname()[0]
    finally:
        probe.close()


class TransferGroup:
    """One weight-transfer group of `world_size` ranks; the constructor returns once every rank joined (all block in
    it). CPU: gloo over rank 0's store at (`master_address`, `master_port`); rank 0 passes the listening socket it
    told the servers about (`listen_socket`). CUDA: NCCL, from `unique_id` (the 128 bytes of vLLM's
    nccl_unique_id_b64) or else through the store. `broadcast` sends (rank 0) or fills (the others) one tensor."""

    def __init__(self, rank: int, world_size: int, device: torch.device, master_address: str | None = None,
                 master_port: int | None = None, sock: socket.socket | None = None, unique_id: bytes | None = None,
                 timeout_s: float = 300.0):
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.nccl = self.comm = self.pg = self.store = None
        if unique_id is None:
            fd = sock.detach() if sock is not None else None       # the store's daemon owns the listener from here on
            self.store = dist.TCPStore(master_address, master_port, world_size, rank == 0,
                                       timedelta(seconds=timeout_s), master_listen_fd=fd, use_libuv=False)
        if self.device.type != "cuda":
            assert self.store is not None, "a CPU transfer group needs master_address and master_port (gloo)"
            self.pg = dist.ProcessGroupGloo(dist.PrefixStore("openzaya-transfer", self.store), rank, world_size,
                                            timedelta(seconds=timeout_s))
            return
        self.nccl = _Nccl()
        if unique_id is None and rank == 0:
            unique_id = self.nccl.unique_id()
            self.store.set(UNIQUE_ID_KEY, unique_id_pickle(unique_id))
        elif unique_id is None:
            unique_id = unique_id_from_pickle(self.store.get(UNIQUE_ID_KEY))
        with torch.cuda.device(self.device):
            self.comm = self.nccl.init_rank(world_size, unique_id, rank)
            warm = torch.zeros(1, device=self.device)
            self.nccl.all_reduce_sum(warm, self.comm)
            torch.cuda.current_stream(self.device).synchronize()

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` into every rank's `t` (contiguous, on this group's device)."""
        assert t.is_contiguous() and t.device.type == self.device.type, (t.device, self.device)
        if self.nccl is not None:
            self.nccl.broadcast(t, self.comm, 0)
        else:
            self.pg.broadcast(t, 0).wait()
        return t

    def synchronize(self):
        if self.nccl is not None:
            torch.cuda.current_stream(self.device).synchronize()

    def close(self):
        if self.comm is not None:
            self.nccl.lib.ncclCommDestroy(self.comm)
        self.comm = self.pg = self.store = None
