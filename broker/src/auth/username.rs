//! The MQTT username of an IoT Hub client (edgehub-contract.md §1.2):
//!
//! ```text
//! {host}/{device}[/{module}]/?{params}    '?' starts the last segment
//! {host}/{device}[/{module}]/{params}     the last segment holds "api-version="
//! params = name=value *("&" name=value), values percent-decoded, the first of a name wins
//! ```
//!
//! `api-version` is mandatory (its value is not checked); `DeviceClientType`, `model-id` and
//! `auth-chain` are kept; other parameters are ignored. The host is not checked here (the SAS
//! token's audience is).

use super::identity::id_string;
use percent_encoding::percent_decode_str;

/// What an IoT Hub client's username says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IotUsername {
    pub host: String,
    pub device: String,
    pub module: Option<String>,
    pub api_version: String,
    pub client_type: Option<String>,
    pub model_id: Option<String>,
    pub auth_chain: Option<String>,
}

impl IotUsername {
    /// Parses a username; `None` if it does not follow the grammar (a plain MQTT username).
    #[must_use]
    pub fn parse(username: &str) -> Option<IotUsername> {
        let segments: Vec<&str> = username.split('/').collect();
        let (last, ids) = segments.split_last()?;
        let params = match last.strip_prefix('?') {
            Some(params) => params,
            None if last.contains("api-version=") => last,
            None => return None,
        };
        let (host, device, module) = match ids {
            [host, device] => (host, device, None),
            [host, device, module] => (host, device, Some(module)),
            _ => return None,
        };
        if host.is_empty() || device.is_empty() || module.is_some_and(|m| m.is_empty()) {
            return None;
        }
        let (mut api_version, mut client_type, mut model_id, mut auth_chain) =
            (None, None, None, None);
        for param in params.split('&') {
            let (name, value) = param.split_once('=').unwrap_or((param, ""));
            let slot = match name {
                "api-version" => &mut api_version,
                "DeviceClientType" => &mut client_type,
                "model-id" => &mut model_id,
                "auth-chain" => &mut auth_chain,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(percent_decode_str(value).decode_utf8().ok()?.into_owned());
            }
        }
        Some(IotUsername {
            host: (*host).to_owned(),
            device: (*device).to_owned(),
            module: module.map(|m| (*m).to_owned()),
            api_version: api_version?,
            client_type,
            model_id,
            auth_chain,
        })
    }

    /// The client id the username requires: `device` or `device/module`.
    #[must_use]
    pub fn client_id(&self) -> String {
        id_string(&self.device, self.module.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Goal: the usernames the SDKs send (contract §1.2 and §12) parse into their parts.
    #[test]
    fn the_sdks_usernames_parse() {
        let csharp = "myhub.azure-devices.net/myEdge/filter/?api-version=2020-09-30\
                      &DeviceClientType=Microsoft.Azure.Devices.Client%2F1.41.0%20%28.NET%29";
        let parsed = IotUsername::parse(csharp).expect("parses");
        assert_eq!(parsed.client_id(), "myEdge/filter");
        assert_eq!(parsed.host, "myhub.azure-devices.net");
        assert_eq!(parsed.api_version, "2020-09-30");
        assert_eq!(
            parsed.client_type.as_deref(),
            Some("Microsoft.Azure.Devices.Client/1.41.0 (.NET)")
        );
        let node =
            "hub/d/m/?api-version=2021-04-12&DeviceClientType=azure-iot-device%2F1.18.2%20(node)";
        assert_eq!(IotUsername::parse(node).expect("parses").client_id(), "d/m");
        let device = "hub/leaf/api-version=2019-10-01&model-id=dtmi%3Acom%3Ax%3B1";
        let parsed = IotUsername::parse(device).expect("parses");
        assert_eq!(
            (parsed.client_id().as_str(), parsed.model_id.as_deref()),
            ("leaf", Some("dtmi:com:x;1"))
        );
        let first_wins = IotUsername::parse("h/d/?api-version=1&api-version=2").expect("parses");
        assert_eq!(first_wins.api_version, "1");
    }

    /// Goal: what is not an IoT Hub username is not taken for one.
    #[test]
    fn other_usernames_are_not_iot_hub_ones() {
        for other in [
            "alice",
            "h/d",
            "h/d/?DeviceClientType=x",
            "h/d/m/x/?api-version=1",
            "/d/?api-version=1",
            "h//?api-version=1",
            "h/d/params",
        ] {
            assert_eq!(IotUsername::parse(other), None, "{other:?}");
        }
    }

    proptest! {
        /// Goal: any input parses or is not an IoT Hub username; none panics.
        #[test]
        fn arbitrary_usernames_never_panic(username in ".{0,200}") {
            let _ = IotUsername::parse(&username);
        }
    }
}
