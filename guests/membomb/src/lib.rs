//! membomb (hostile): allocates without bound. The memory limit stops it.
wit_bindgen::generate!({ path: "../../wit/agent", world: "agent" });


struct MemBomb;

impl Guest for MemBomb {
    fn on_message(_msg: Message) -> Result<(), String> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut chunk = vec![0u8; 1 << 20];
            chunk[0] = hoard.len() as u8;
            hoard.push(core::hint::black_box(chunk));
        }
    }
}

export!(MemBomb);
