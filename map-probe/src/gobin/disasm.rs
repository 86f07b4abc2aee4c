//! Where uprobes may go inside one Go function: past the stack-bound check
//! and on every RET. See notes §2.1/§2.2 for why (morestack restarts the
//! function; kernel return probes rewrite return addresses on stacks Go moves).
//!
//! Prologue shapes emitted by cmd/internal/obj/x86/obj6.go `stacksplit`:
//!   small frame:  CMPQ SP, 16(R14); JLS morestack
//!   large frame:  LEAQ -N(SP), R12; CMPQ R12, 16(R14); JLS morestack
//!   huge frame:   MOVQ SP, R12; SUBQ $N, R12; JCS morestack;
//!                 CMPQ R12, 16(R14); JLS morestack
//! Assembly (ABI0) functions load g from TLS first: MOVQ FS:-8, CX; CMPQ SP, 16(CX).

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

use super::{GoBinError, ProbePoints};

/// `g.stackguard0` is the third word of `g` (after stack.lo, stack.hi).
const STACKGUARD0: u64 = 0x10;
/// No stack check begins later than this many instructions into a function.
const MAX_PROLOGUE: usize = 5;

fn decode_all(code: &[u8], entry: u64, name: &str) -> Result<Vec<Instruction>, GoBinError> {
    let mut dec = Decoder::with_ip(64, code, entry, DecoderOptions::NONE);
    let mut out = Vec::with_capacity(code.len() / 4);
    let mut ins = Instruction::default();
    while dec.can_decode() {
        dec.decode_out(&mut ins);
        if ins.code() == Code::INVALID {
            return Err(GoBinError::Decode(format!(
                "{name}: cannot decode the instruction at {:#x} ({:?})",
                ins.ip(),
                dec.last_error()
            )));
        }
        out.push(ins);
    }
    Ok(out)
}

fn is_reg(ins: &Instruction, op: u32, reg: Register) -> bool {
    ins.op_kind(op) == OpKind::Register && ins.op_register(op) == reg
}

/// `CMP reg, [g+0x10]`, where `g` is R14 (ABIInternal) or the register the
/// function just loaded g into from TLS.
fn is_stack_check(ins: &Instruction, g: Register) -> bool {
    ins.mnemonic() == Mnemonic::Cmp
        && (is_reg(ins, 0, Register::RSP) || is_reg(ins, 0, Register::R12))
        && ins.op_kind(1) == OpKind::Memory
        && ins.memory_base() == g
        && ins.memory_index() == Register::None
        && ins.memory_displacement64() == STACKGUARD0
        && ins.segment_prefix() == Register::None
}

/// Instructions allowed before the CMP; returns the g register they imply.
fn prologue_step(ins: &Instruction, g: Register) -> Option<Register> {
    let r12_from_sp = match ins.mnemonic() {
        Mnemonic::Lea => is_reg(ins, 0, Register::R12) && ins.memory_base() == Register::RSP,
        Mnemonic::Mov if is_reg(ins, 0, Register::R12) => is_reg(ins, 1, Register::RSP),
        Mnemonic::Sub => is_reg(ins, 0, Register::R12),
        Mnemonic::Jb => true,
        _ => false,
    };
    if r12_from_sp {
        return Some(g);
    }
    // MOVQ FS:0xfffffffffffffff8, reg: g from TLS in assembly functions.
    if ins.mnemonic() == Mnemonic::Mov
        && ins.op_kind(0) == OpKind::Register
        && ins.op_kind(1) == OpKind::Memory
        && ins.memory_segment() == Register::FS
        && ins.memory_base() == Register::None
    {
        return Some(ins.op_register(0));
    }
    None
}

pub(crate) fn probe_points(code: &[u8], entry: u64, name: &str) -> Result<ProbePoints, GoBinError> {
    let insns = decode_all(code, entry, name)?;
    let mut after_check = entry;
    let mut g = Register::R14;
    for (i, ins) in insns.iter().enumerate().take(MAX_PROLOGUE) {
        if is_stack_check(ins, g) {
            let jump = insns.get(i + 1).filter(|j| j.mnemonic() == Mnemonic::Jbe);
            let Some(jump) = jump else {
                return Err(GoBinError::Decode(format!(
                    "{name}: stack check at {:#x} is not followed by JBE",
                    ins.ip()
                )));
            };
            after_check = jump.next_ip();
            break;
        }
        match prologue_step(ins, g) {
            Some(reg) => g = reg,
            None => break,
        }
    }
    if let Some(at) = insns.iter().find(|i| i.ip() == after_check) {
        if at.has_lock_prefix() {
            return Err(GoBinError::Decode(format!(
                "{name}: the first instruction after the stack check ({after_check:#x}) \
                 is LOCK-prefixed; a uprobe there is not safe"
            )));
        }
    }
    let rets = insns
        .iter()
        .filter(|i| i.mnemonic() == Mnemonic::Ret)
        .map(|i| i.ip())
        .collect();
    Ok(ProbePoints {
        entry,
        after_check,
        rets,
    })
}

/// A direct CALL to one of the functions asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallSite {
    /// The CALL instruction and the one after it (where the call returns).
    pub call: u64,
    pub next: u64,
    pub target: u64,
    /// A branch in the function jumps to `next` as well: code after the
    /// CALL also runs when the CALL did not (an inlined fast path that
    /// continues there), so a probe on `next` is no end of the call alone.
    pub joined: bool,
}

/// Every `CALL rel32` in one function's code whose target is in `targets`
/// (sorted). Undecodable bytes end the scan of the function (Go emits none;
/// a corrupt binary gets no points rather than wrong ones).
pub(crate) fn calls_to(code: &[u8], entry: u64, targets: &[u64]) -> Vec<CallSite> {
    let mut dec = Decoder::with_ip(64, code, entry, DecoderOptions::NONE);
    let mut ins = Instruction::default();
    let mut calls = Vec::new();
    let mut branched_to = Vec::new();
    while dec.can_decode() {
        dec.decode_out(&mut ins);
        if ins.code() == Code::INVALID {
            return Vec::new();
        }
        if ins.op0_kind() != OpKind::NearBranch64 {
            continue;
        }
        let t = ins.near_branch_target();
        if ins.is_call_near() {
            if targets.binary_search(&t).is_ok() {
                calls.push(CallSite {
                    call: ins.ip(),
                    next: ins.next_ip(),
                    target: t,
                    joined: false,
                });
            }
        } else if ins.is_jmp_short_or_near() || ins.is_jcc_short_or_near() {
            branched_to.push(t);
        }
    }
    branched_to.sort_unstable();
    for c in &mut calls {
        c.joined = branched_to.binary_search(&c.next).is_ok();
    }
    calls
}

/// One compare-and-swap instruction (`LOCK CMPXCHG`, `LOCK CMPXCHG16B`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CasInsn {
    pub ip: u64,
    /// The instruction after it: where a probe sees the flags it left.
    pub next: u64,
    /// Its memory operand as registers (`CAS_REG_*` numbers, 0 none),
    /// scale and displacement; a RIP-relative one as its absolute address.
    pub base: u8,
    pub index: u8,
    pub scale: u8,
    pub disp: i32,
    pub absolute: Option<u64>,
    /// The function pushes no frame pointer (a small leaf): its return
    /// address stays at `*(rsp)`.
    pub frameless: bool,
    /// A branch also lands on `next` (the flags there are not always this
    /// CAS's), or `next` is LOCK-prefixed: no probe goes there.
    pub unsafe_next: bool,
}

/// `CAS_REG_*` number of a 64-bit general register, 0 for anything else.
fn reg_number(r: Register) -> u8 {
    const ORDER: [Register; 16] = [
        Register::RAX,
        Register::RBX,
        Register::RCX,
        Register::RDX,
        Register::RSI,
        Register::RDI,
        Register::RBP,
        Register::RSP,
        Register::R8,
        Register::R9,
        Register::R10,
        Register::R11,
        Register::R12,
        Register::R13,
        Register::R14,
        Register::R15,
    ];
    ORDER
        .iter()
        .position(|&o| o == r)
        .map_or(0, |i| i as u8 + 1)
}

/// Every LOCK-prefixed CMPXCHG and CMPXCHG16B in one function's code.
/// Undecodable bytes end the scan (a corrupt binary gets no points).
pub(crate) fn cas_instructions(code: &[u8], entry: u64) -> Vec<CasInsn> {
    let mut dec = Decoder::with_ip(64, code, entry, DecoderOptions::NONE);
    let mut ins = Instruction::default();
    let mut out = Vec::new();
    let mut branched_to = Vec::new();
    let mut locked = Vec::new();
    let mut framed = false;
    let mut n = 0;
    while dec.can_decode() {
        n += 1;
        dec.decode_out(&mut ins);
        if ins.code() == Code::INVALID {
            return Vec::new();
        }
        if ins.has_lock_prefix() {
            locked.push(ins.ip());
        }
        // Go's frame setup, right after the stack check: PUSHQ BP.
        framed |= n <= 2 * MAX_PROLOGUE
            && ins.mnemonic() == Mnemonic::Push
            && is_reg(&ins, 0, Register::RBP);
        if ins.op0_kind() == OpKind::NearBranch64
            && (ins.is_jmp_short_or_near() || ins.is_jcc_short_or_near())
        {
            branched_to.push(ins.near_branch_target());
        }
        let cas = matches!(ins.mnemonic(), Mnemonic::Cmpxchg | Mnemonic::Cmpxchg16b);
        if !cas || !ins.has_lock_prefix() || ins.op0_kind() != OpKind::Memory {
            continue;
        }
        let rip = ins.memory_base() == Register::RIP;
        // CMPXCHG loads RAX (CMPXCHG16B RDX:RAX) on failure: an operand
        // built from them is gone by the probe, so its address is unknown.
        let clobbered = |r: Register| matches!(r, Register::RAX | Register::RDX);
        let (base, index) = if rip || clobbered(ins.memory_base()) || clobbered(ins.memory_index())
        {
            (0, 0)
        } else {
            (
                reg_number(ins.memory_base()),
                reg_number(ins.memory_index()),
            )
        };
        out.push(CasInsn {
            ip: ins.ip(),
            next: ins.next_ip(),
            base,
            index,
            scale: ins.memory_index_scale() as u8,
            disp: if rip {
                0
            } else {
                ins.memory_displacement64() as i64 as i32
            },
            absolute: rip.then(|| ins.memory_displacement64()),
            frameless: false,
            unsafe_next: false,
        });
    }
    branched_to.sort_unstable();
    for c in &mut out {
        c.frameless = !framed;
        c.unsafe_next = branched_to.binary_search(&c.next).is_ok() || locked.contains(&c.next);
    }
    out
}
