"""A tiny eBPF instruction encoder with labels, so a program reads like a macro listing.

Only the instructions the counting core uses: 64/32-bit ALU with immediate or register,
MOV, LDX/STX/ST memory access, LD_IMM64 (plain and BPF_PSEUDO_MAP_FD), conditional and
unconditional jumps to labels, helper calls, EXIT and 64-bit atomic add (BPF_STX|BPF_XADD,
the encoding BPF_ATOMIC|BPF_ADD kept). All of it is in the kernel's instruction set since 4.x
(JLT/JLE/JSLT/JSLE: 4.14; none of the BPF_ATOMIC extensions of 5.12 are used).

    a = Asm()
    a.mov64_reg(R6, R1)
    a.ldx(W, R0, R6, 0)
    a.jmp_imm(JEQ, R0, 0, "out")
    ...
    a.label("out")
    a.exit()
    code = a.assemble()          # bytes, 8 per instruction slot
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# registers
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)
FP = R10

# instruction classes
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = range(8)
# sizes
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
_SIZE_BYTES = {W: 4, H: 2, B: 1, DW: 8}
# modes
IMM, ABS, IND, MEM, XADD = 0x00, 0x20, 0x40, 0x60, 0xC0
ATOMIC = XADD
# ALU operations
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, NEG, MOD, XOR, MOV, ARSH = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0)
# sources
K, X = 0x00, 0x08
# jump operations
JA, JEQ, JGT, JGE, JSET, JNE, JSGT, JSGE, CALL, EXIT, JLT, JLE, JSLT, JSLE = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0)

PSEUDO_MAP_FD = 1

# helper function ids (enum bpf_func_id)
FN_MAP_LOOKUP_ELEM = 1
FN_SKB_LOAD_BYTES = 26

_INSN = struct.Struct("<BBhi")
_ALU_NAMES = {ADD: "+=", SUB: "-=", MUL: "*=", DIV: "/=", OR: "|=", AND: "&=", LSH: "<<=",
              RSH: ">>=", MOD: "%=", XOR: "^=", MOV: "=", ARSH: "s>>="}
_JMP_NAMES = {JEQ: "==", JGT: ">", JGE: ">=", JSET: "&", JNE: "!=", JSGT: "s>", JSGE: "s>=",
              JLT: "<", JLE: "<=", JSLT: "s<", JSLE: "s<="}


class AsmError(ValueError):
    """A program could not be assembled (unknown or duplicate label, jump out of range)."""


@dataclass
class Insn:
    """One instruction slot; `target` is a label to resolve into `off` at assembly."""

    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0
    target: str | None = None

    def encode(self) -> bytes:
        imm = self.imm
        if imm >= 1 << 31:  # an unsigned 32-bit pattern: store its two's complement
            imm -= 1 << 32
        return _INSN.pack(self.code, (self.src << 4) | self.dst, self.off, imm)


class Asm:
    """An instruction list under construction, with labels for jump targets."""

    def __init__(self) -> None:
        self.insns: list[Insn] = []
        self.labels: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.insns)

    # -- labels
    def label(self, name: str) -> None:
        if name in self.labels:
            raise AsmError(f"label {name!r} defined twice")
        self.labels[name] = len(self.insns)

    def _emit(self, insn: Insn) -> None:
        self.insns.append(insn)

    # -- ALU
    def alu64_imm(self, op: int, dst: int, imm: int) -> None:
        self._emit(Insn(ALU64 | op | K, dst, 0, 0, imm))

    def alu64_reg(self, op: int, dst: int, src: int) -> None:
        self._emit(Insn(ALU64 | op | X, dst, src))

    def alu32_imm(self, op: int, dst: int, imm: int) -> None:
        self._emit(Insn(ALU | op | K, dst, 0, 0, imm))

    def mov64_imm(self, dst: int, imm: int) -> None:
        self.alu64_imm(MOV, dst, imm)

    def mov64_reg(self, dst: int, src: int) -> None:
        self.alu64_reg(MOV, dst, src)

    # -- memory
    def ldx(self, size: int, dst: int, src: int, off: int) -> None:
        """dst = *(size *)(src + off)"""
        self._emit(Insn(LDX | size | MEM, dst, src, off))

    def stx(self, size: int, dst: int, src: int, off: int) -> None:
        """*(size *)(dst + off) = src"""
        self._emit(Insn(STX | size | MEM, dst, src, off))

    def st(self, size: int, dst: int, off: int, imm: int) -> None:
        """*(size *)(dst + off) = imm"""
        self._emit(Insn(ST | size | MEM, dst, 0, off, imm))

    def atomic_add(self, size: int, dst: int, src: int, off: int) -> None:
        """lock *(size *)(dst + off) += src  (BPF_XADD; W or DW only)"""
        if size not in (W, DW):
            raise AsmError("atomic add is 32 or 64 bits")
        self._emit(Insn(STX | size | XADD, dst, src, off, ADD))

    def ld_imm64(self, dst: int, imm: int, src: int = 0) -> None:
        """dst = 64-bit immediate (two slots); src PSEUDO_MAP_FD makes imm a map fd."""
        self._emit(Insn(LD | DW | IMM, dst, src, 0, imm & 0xFFFFFFFF))
        self._emit(Insn(0, 0, 0, 0, (imm >> 32) & 0xFFFFFFFF))

    def ld_map_fd(self, dst: int, fd: int) -> None:
        """dst = the map whose descriptor is fd (the verifier replaces it by the map's address)."""
        self.ld_imm64(dst, fd, PSEUDO_MAP_FD)

    # -- control flow
    def jmp_imm(self, op: int, dst: int, imm: int, target: str) -> None:
        self._emit(Insn(JMP | op | K, dst, 0, 0, imm, target))

    def jmp_reg(self, op: int, dst: int, src: int, target: str) -> None:
        self._emit(Insn(JMP | op | X, dst, src, 0, 0, target))

    def ja(self, target: str) -> None:
        self._emit(Insn(JMP | JA, target=target))

    def call(self, helper: int) -> None:
        self._emit(Insn(JMP | CALL, imm=helper))

    def exit(self) -> None:
        self._emit(Insn(JMP | EXIT))

    # -- output
    def resolve(self) -> list[Insn]:
        """The instructions with every jump's offset filled in from its label."""
        for i, insn in enumerate(self.insns):
            if insn.target is None:
                continue
            if insn.target not in self.labels:
                raise AsmError(f"jump to undefined label {insn.target!r}")
            off = self.labels[insn.target] - (i + 1)
            if not -(1 << 15) <= off < (1 << 15):
                raise AsmError(f"jump to {insn.target!r} out of range")
            insn.off = off
        return self.insns

    def assemble(self) -> bytes:
        return b"".join(insn.encode() for insn in self.resolve())

    def listing(self) -> str:
        """A readable listing (for reviews and error reports)."""
        names = {v: k for k, v in self.labels.items()}
        out = []
        high = False  # the second slot of an LD_IMM64
        for i, insn in enumerate(self.resolve()):
            if i in names:
                out.append(f"{names[i]}:")
            if not high:
                out.append(f"  {i:4d}  {disasm(insn)}")
            high = not high and insn.code == LD | DW | IMM
        return "\n".join(out)


def disasm(insn: Insn) -> str:
    """One instruction in the kernel verifier's notation (enough for this project's programs)."""
    cls, code = insn.code & 0x07, insn.code
    d, s = f"r{insn.dst}", f"r{insn.src}"
    if cls in (ALU64, ALU):
        op, reg = code & 0xF0, code & X
        rhs = s if reg else str(insn.imm)
        pre = "" if cls == ALU64 else "w"
        return f"{pre}{d} {_ALU_NAMES.get(op, hex(op))} {rhs}"
    size = {W: "u32", H: "u16", B: "u8", DW: "u64"}.get(code & 0x18, "?")
    if cls == LDX:
        return f"{d} = *({size} *)({s} {insn.off:+d})"
    if cls == STX:
        if code & 0xE0 == XADD:
            return f"lock *({size} *)({d} {insn.off:+d}) += {s}"
        return f"*({size} *)({d} {insn.off:+d}) = {s}"
    if cls == ST:
        return f"*({size} *)({d} {insn.off:+d}) = {insn.imm}"
    if cls == LD:
        return f"{d} = {'map_fd ' if insn.src == PSEUDO_MAP_FD else ''}{insn.imm} ll"
    if cls == JMP:
        op = code & 0xF0
        if op == CALL:
            return f"call {insn.imm}"
        if op == EXIT:
            return "exit"
        if op == JA:
            return f"goto {insn.target or insn.off}"
        rhs = s if code & X else str(insn.imm)
        return f"if {d} {_JMP_NAMES.get(op, hex(op))} {rhs} goto {insn.target or insn.off}"
    if code == 0:
        return f"(imm64 high {insn.imm})"
    return f"?? code {code:#x}"
