//! An agent folder's `runagent.config.json` / `.yaml`, parsed and validated as `agentry serve`
//! does: any text must give a config or a `ConfigError`, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = Path::new("/agent");
    for name in ["runagent.config.json", "runagent.config.yaml"] {
        if let Ok(config) = agentry_core::AgentConfig::parse(dir, &dir.join(name), text) {
            // A valid config answers what the server asks of it.
            for ep in &config.entrypoints {
                let _ = config.entrypoint(&ep.tag);
                let _ = ep.is_streaming();
            }
        }
    }
});
