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

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic,
    OpAccess, OpKind, Register, RflagsBits,
};

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

/// One compare-and-swap instruction (`LOCK CMPXCHG`, `LOCK CMPXCHG16B`),
/// or another atomic write to memory (`XCHG`, `LOCK XADD`, `LOCK ADD/OR/
/// AND/...`): the words those write are what false sharing is made of.
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
    /// Not a compare-and-swap: an atomic write that cannot fail.
    pub write_only: bool,
    /// The first instruction of a block reached only when this CAS failed
    /// (found through the SETcc/TEST/Jcc the compiler branches on): a probe
    /// there counts failures and costs nothing when the CAS succeeds.
    pub fail_block: Option<u64>,
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

/// Every LOCK-prefixed CMPXCHG and CMPXCHG16B in one function's code, and
/// every other atomic write to memory. Undecodable bytes end the scan (a
/// corrupt binary gets no points).
pub(crate) fn cas_instructions(code: &[u8], entry: u64) -> Vec<CasInsn> {
    let mut dec = Decoder::with_ip(64, code, entry, DecoderOptions::NONE);
    let mut all = Vec::with_capacity(code.len() / 4);
    while dec.can_decode() {
        let ins = dec.decode();
        if ins.code() == Code::INVALID {
            return Vec::new();
        }
        all.push(ins);
    }
    // Go's frame setup, right after the stack check: PUSHQ BP.
    let framed = all
        .iter()
        .take(2 * MAX_PROLOGUE)
        .any(|i| i.mnemonic() == Mnemonic::Push && is_reg(i, 0, Register::RBP));
    let mut branched_to: Vec<u64> = all
        .iter()
        .filter(|i| {
            i.op0_kind() == OpKind::NearBranch64
                && (i.is_jmp_short_or_near() || i.is_jcc_short_or_near())
        })
        .map(|i| i.near_branch_target())
        .collect();
    branched_to.sort_unstable();
    let locked: Vec<u64> = all
        .iter()
        .filter(|i| i.has_lock_prefix())
        .map(|i| i.ip())
        .collect();
    let mut out = Vec::new();
    for (n, ins) in all.iter().enumerate() {
        let Some((write_only, clobbered)) = atomic_write(ins) else {
            continue;
        };
        let rip = ins.memory_base() == Register::RIP;
        // A register the instruction loads (CMPXCHG's RAX, XADD's and XCHG's
        // source) is gone by the probe: an operand built from it is unknown.
        let lost = |r: Register| r != Register::None && clobbered.contains(&r.full_register());
        let (base, index) = if rip || lost(ins.memory_base()) || lost(ins.memory_index()) {
            (0, 0)
        } else {
            (
                reg_number(ins.memory_base()),
                reg_number(ins.memory_index()),
            )
        };
        let next = ins.next_ip();
        out.push(CasInsn {
            ip: ins.ip(),
            next,
            base,
            index,
            scale: ins.memory_index_scale() as u8,
            disp: if rip {
                0
            } else {
                ins.memory_displacement64() as i64 as i32
            },
            absolute: rip.then(|| ins.memory_displacement64()),
            frameless: !framed,
            unsafe_next: branched_to.binary_search(&next).is_ok() || locked.contains(&next),
            write_only,
            fail_block: if write_only {
                None
            } else {
                fail_block(&all, n, &branched_to, &locked)
            },
        });
    }
    out
}

/// Whether `ins` writes memory atomically: Some((cannot fail, the
/// registers it loads)) for a locked read-modify-write or an XCHG with
/// memory (implicitly locked), None for anything else.
fn atomic_write(ins: &Instruction) -> Option<(bool, Vec<Register>)> {
    let mem = (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Memory);
    if !mem {
        return None;
    }
    let regs = || {
        (0..ins.op_count())
            .filter(|&i| ins.op_kind(i) == OpKind::Register)
            .map(|i| ins.op_register(i).full_register())
            .collect::<Vec<_>>()
    };
    match ins.mnemonic() {
        Mnemonic::Cmpxchg if ins.has_lock_prefix() => Some((false, vec![Register::RAX])),
        Mnemonic::Cmpxchg16b if ins.has_lock_prefix() => {
            Some((false, vec![Register::RAX, Register::RDX]))
        }
        Mnemonic::Xchg => Some((true, regs())),
        Mnemonic::Xadd if ins.has_lock_prefix() => Some((true, regs())),
        Mnemonic::Add
        | Mnemonic::Sub
        | Mnemonic::And
        | Mnemonic::Or
        | Mnemonic::Xor
        | Mnemonic::Inc
        | Mnemonic::Dec
        | Mnemonic::Neg
        | Mnemonic::Not
        | Mnemonic::Bts
        | Mnemonic::Btr
        | Mnemonic::Btc
            if ins.has_lock_prefix() && ins.op0_kind() == OpKind::Memory =>
        {
            Some((true, Vec::new()))
        }
        _ => None,
    }
}

/// How many instructions after a CAS the branch on its result may come.
const MAX_FLAG_CHAIN: usize = 8;

/// The block only a failed CAS (`all[n]`) reaches, if the compiler laid
/// one out: it follows the CAS's ZF, directly or through `SETcc r; TEST
/// r, r`, to the conditional jump that decides, and takes the side that
/// means "failed" when that side has no other way in (no other branch
/// lands there; a jump target is not fallen into from above).
fn fail_block(all: &[Instruction], n: usize, branched_to: &[u64], locked: &[u64]) -> Option<u64> {
    let mut factory = InstructionInfoFactory::new();
    // Some(true): ZF set means the CAS swapped.
    let mut zf_swapped = Some(true);
    // The register holding "swapped" (true) or "failed" (false) as 0/1.
    let mut held: Option<(Register, bool)> = None;
    for (k, ins) in all.iter().enumerate().skip(n + 1).take(MAX_FLAG_CHAIN) {
        if k > n + 1 && branched_to.binary_search(&ins.ip()).is_ok() {
            return None;
        }
        if ins.is_jcc_short_or_near() {
            let swapped_if_taken = match (ins.mnemonic(), zf_swapped?) {
                (Mnemonic::Je, z) => z,
                (Mnemonic::Jne, z) => !z,
                _ => return None,
            };
            let (dest, fallen_into) = if swapped_if_taken {
                (ins.next_ip(), true)
            } else {
                (ins.near_branch_target(), false)
            };
            // Not inside the function (or not on an instruction): no block.
            let at = all.iter().position(|i| i.ip() == dest)?;
            let ways_in = branched_to.iter().filter(|&&t| t == dest).count();
            let alone = if fallen_into {
                ways_in == 0
            } else {
                ways_in == 1 && at.checked_sub(1).is_some_and(|p| !falls_through(&all[p]))
            };
            return (alone && !locked.contains(&dest)).then_some(dest);
        }
        match ins.mnemonic() {
            Mnemonic::Sete | Mnemonic::Setne if ins.op0_kind() == OpKind::Register => {
                let z = zf_swapped?;
                let swapped_when_set = if ins.mnemonic() == Mnemonic::Sete {
                    z
                } else {
                    !z
                };
                held = Some((ins.op0_register().full_register(), swapped_when_set));
                continue;
            }
            Mnemonic::Test
                if ins.op0_kind() == OpKind::Register
                    && ins.op1_kind() == OpKind::Register
                    && ins.op0_register() == ins.op1_register() =>
            {
                let (r, swapped_when_set) = held?;
                if ins.op0_register().full_register() != r {
                    return None;
                }
                // ZF set: the register is 0.
                zf_swapped = Some(!swapped_when_set);
                continue;
            }
            _ => {}
        }
        if ins.flow_control() != FlowControl::Next {
            return None;
        }
        if ins.rflags_modified() & RflagsBits::ZF != 0 {
            zf_swapped = None;
        }
        if let Some((r, _)) = held {
            let info = factory.info(ins);
            let written = info.used_registers().iter().any(|u| {
                u.register().full_register() == r
                    && !matches!(u.access(), OpAccess::Read | OpAccess::CondRead)
            });
            if written {
                held = None;
            }
        }
    }
    None
}

/// Whether execution can run from `ins` into the instruction after it.
fn falls_through(ins: &Instruction) -> bool {
    !matches!(
        ins.flow_control(),
        FlowControl::UnconditionalBranch
            | FlowControl::IndirectBranch
            | FlowControl::Return
            | FlowControl::Interrupt
            | FlowControl::Exception
    )
}
