//! spin (hostile): loops forever on any message. Fuel stops it.
wit_bindgen::generate!({ path: "../../wit/agent", world: "agent" });


struct Spin;

impl Guest for Spin {
    fn on_message(msg: Message) -> Result<(), String> {
        let mut x = msg.number;
        loop {
            x = core::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

export!(Spin);
