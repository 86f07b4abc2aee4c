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
