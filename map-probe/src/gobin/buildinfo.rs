//! The Go version and the main module recorded in `.go.buildinfo` (format:
//! `debug/buildinfo`).

use super::image::Image;
use super::GoVersion;

const MAGIC: &[u8; 14] = b"\xff Go buildinf:";
/// Go 1.18+ stores the strings inline after the 32-byte header, not behind pointers.
const FLAG_INLINE_STRINGS: u8 = 2;

/// Finds the buildinfo blob: by section, or (stripped section headers) by
/// scanning writable segments at the 16-byte alignment the linker uses.
fn find(img: &Image) -> Option<u64> {
    if let Some(s) = img.section(".go.buildinfo") {
        return Some(s.vaddr);
    }
    for seg in img.segments.iter().filter(|s| s.write) {
        let bytes = img.bytes_from(seg.vaddr)?;
        let skew = ((16 - seg.vaddr % 16) % 16) as usize;
        let mut i = skew;
        while i + 32 <= bytes.len() {
            if &bytes[i..i + 14] == MAGIC {
                return Some(seg.vaddr + i as u64);
            }
            i += 16;
        }
    }
    None
}

/// The raw version string, e.g. "go1.26.8", or None if the binary has no buildinfo.
pub(crate) fn version_string(img: &Image) -> Option<String> {
    let at = find(img)?;
    let hdr = img.bytes(at, 32)?;
    if &hdr[..14] != MAGIC || hdr[14] != 8 {
        return None;
    }
    if hdr[15] & FLAG_INLINE_STRINGS != 0 {
        let rest = img.bytes_from(at + 32)?;
        let (len, n) = uvarint(rest)?;
        let s = rest.get(n..n.checked_add(usize::try_from(len).ok()?)?)?;
        return Some(String::from_utf8_lossy(s).into_owned());
    }
    // Before Go 1.18: a pointer to a Go string header {ptr, len}.
    let strhdr = img.word(at + 16)?;
    let ptr = img.word(strhdr)?;
    let len = img.word(strhdr + 8)?;
    let s = img.bytes(ptr, usize::try_from(len).ok()?)?;
    Some(String::from_utf8_lossy(s).into_owned())
}

/// The main module's path (the `mod` line of the module info, e.g.
/// "github.com/acme/shop"), or None when the binary was built without
/// module support or has no buildinfo. Go 1.18+ layout only (inline strings).
pub(crate) fn main_module(img: &Image) -> Option<String> {
    let at = find(img)?;
    let hdr = img.bytes(at, 32)?;
    if &hdr[..14] != MAGIC || hdr[15] & FLAG_INLINE_STRINGS == 0 {
        return None;
    }
    let rest = img.bytes_from(at + 32)?;
    let (vlen, n) = uvarint(rest)?;
    let rest = rest.get(n.checked_add(usize::try_from(vlen).ok()?)?..)?;
    let (mlen, n) = uvarint(rest)?;
    let info = rest.get(n..n.checked_add(usize::try_from(mlen).ok()?)?)?;
    module_line(&String::from_utf8_lossy(info))
}

/// The path on the `mod\t<path>\t<version>\t<sum>` line of a module info
/// string (which starts and ends with 16-byte sentinels, skipped here).
fn module_line(info: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix("mod\t"))
        .and_then(|rest| rest.split('\t').next())
        .filter(|p| !p.is_empty())
        .map(str::to_string)
}

pub(crate) fn uvarint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Parses "go1.26.8", "go1.27rc1", "devel go1.27-abcdef ..." leniently:
/// pre-release and devel suffixes count as the .0 release.
pub(crate) fn parse_version(raw: &str) -> Option<GoVersion> {
    let start = raw.find("go1")?;
    let mut nums = [0u32; 3];
    let mut parts = raw[start + 2..].split('.');
    for (i, slot) in nums.iter_mut().enumerate() {
        let Some(part) = parts.next() else { break };
        let digits: String = part.chars().take_while(|c| c.is_ascii_digit()).collect();
        match digits.parse() {
            Ok(n) => *slot = n,
            Err(_) if i > 0 => break,
            Err(_) => return None,
        }
        if digits.len() != part.len() {
            // "27rc1" or "27-abcdef": nothing after this counts.
            break;
        }
    }
    Some(GoVersion {
        major: nums[0],
        minor: nums[1],
        patch: nums[2],
        raw: raw.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> (u32, u32, u32) {
        let v = parse_version(s).unwrap();
        (v.major, v.minor, v.patch)
    }

    #[test]
    fn module_path_from_the_mod_line() {
        let info = "0w\u{af}\u{c}\u{92}t\u{8}\u{2}A\npath\tmapprobe/fixtures/contended\nmod\tmapprobe/fixtures\t(devel)\t\nbuild\t-compiler=gc\n";
        assert_eq!(module_line(info).as_deref(), Some("mapprobe/fixtures"));
        assert_eq!(module_line("path\tcommand-line-arguments\n"), None);
    }

    #[test]
    fn versions() {
        assert_eq!(v("go1.26.8"), (1, 26, 8));
        assert_eq!(v("go1.19.8"), (1, 19, 8));
        assert_eq!(v("go1.27rc1"), (1, 27, 0));
        assert_eq!(v("go1.21"), (1, 21, 0));
        assert_eq!(v("devel go1.27-a1b2c3 Mon Jan 1"), (1, 27, 0));
        assert_eq!(v("go1.22.1 X:boringcrypto"), (1, 22, 1));
        assert!(parse_version("gccgo").is_none());
    }
}
