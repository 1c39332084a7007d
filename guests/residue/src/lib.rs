//! residue: an agent-world guest that looks for what an earlier instance
//! left in its linear memory. Every message is handled by a fresh instance
//! (the node reuses memory slots, resetting them in between), so its
//! 6 MiB zero-initialized static must read as zeros every time. `residue`
//! checks it, replies `residue: clean` or `residue: dirty (N pages)`, then
//! writes a byte into every page of it, more than the node resets with
//! `memset` (4 MiB), so both of its ways of resetting are exercised.
wit_bindgen::generate!({ path: "../../wit/agent", world: "agent" });

use capstan::agent::host;

const SIZE: usize = 6 << 20;
const PAGE: usize = 4096;

static mut AREA: [u8; SIZE] = [0; SIZE];

struct Residue;

impl Guest for Residue {
    fn on_message(msg: Message) -> Result<(), String> {
        if msg.text.trim() != "residue" {
            return host::reply(msg.number, "say residue").map(drop);
        }
        let area = core::ptr::addr_of_mut!(AREA) as *mut u8;
        let mut dirty = 0;
        for page in 0..SIZE / PAGE {
            // SAFETY: within the static; this guest is single-threaded
            let seen = unsafe {
                core::slice::from_raw_parts(area.add(page * PAGE), PAGE)
                    .iter()
                    .any(|b| *b != 0)
            };
            if seen {
                dirty += 1;
            }
        }
        for page in 0..SIZE / PAGE {
            // SAFETY: as above
            unsafe { core::ptr::write_volatile(area.add(page * PAGE + page % PAGE), 0xab) };
        }
        let answer = if dirty == 0 {
            "residue: clean".to_string()
        } else {
            format!("residue: dirty ({dirty} pages)")
        };
        host::reply(msg.number, &answer).map(drop)
    }
}

export!(Residue);
