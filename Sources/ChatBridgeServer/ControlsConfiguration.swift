import ChatBridgeCore
import ChatBridgeLLM
import Configuration
import Foundation
import Yams

/// The structured sections a key-value reader cannot list: the names under `models` and `personas`, and
/// the `routes` list. Read from the YAML file itself (and, for `models.<name>.*` / `personas.<name>.*`
/// given as dotted keys, from those keys' names).
struct StructuredSections {
    var modelNames: [String] = []
    var personaNames: [String] = []
    var routes: [[String: Any]] = []
    var routesProblem: String?

    init() {}

    init(yaml text: String?, dottedKeys: [String]) throws {
        var root: [String: Any] = [:]
        if let text, !text.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty, let node = try Yams.compose(yaml: text) {
            root = Self.plain(node) as? [String: Any] ?? [:]
        }
        func names(_ section: String) -> [String] {
            var found = (root[section] as? [String: Any]).map { Array($0.keys) } ?? []
            for key in dottedKeys where key.hasPrefix(section + ".") {
                let rest = key.dropFirst(section.count + 1)
                if let name = rest.split(separator: ".").first { found.append(String(name)) }
            }
            var seen: Set<String> = []
            return found.filter { seen.insert($0).inserted }.sorted()
        }
        modelNames = names("models")
        personaNames = names("personas")
        if let routes = root["routes"] {
            if let list = routes as? [[String: Any]] {
                self.routes = list
            } else {
                routesProblem = "must be a list of rules, each a mapping with platform, chats, users, profile and/or persona"
            }
        }
    }
}

extension StructuredSections {
    /// A YAML node as mappings, lists and strings exactly as written (`0420001` stays that text; YAML's own
    /// number and date conversions would change ids).
    static func plain(_ node: Node) -> Any? {
        switch node {
        case .scalar(let scalar): return node.null != nil ? nil : scalar.string
        case .mapping(let mapping):
            var result: [String: Any] = [:]
            for (key, value) in mapping { if let name = key.string, let value = plain(value) { result[name] = value } }
            return result
        case .sequence(let sequence): return sequence.compactMap { plain($0) }
        case .alias: return nil
        }
    }

    /// Every scalar of the YAML file under its dotted key, and every list of scalars as a list, as written
    /// (no number or date conversion: `0420001` stays that text). Lists of mappings (`routes`) are read by
    /// ``init(yaml:dottedKeys:)``.
    static func flatten(yaml text: String) throws -> [AbsoluteConfigKey: ConfigValue] {
        var values: [AbsoluteConfigKey: ConfigValue] = [:]
        guard let root = try Yams.compose(yaml: text) else { return values }
        func isNull(_ node: Node) -> Bool { node.null != nil }
        func walk(_ node: Node, _ path: [String]) {
            switch node {
            case .scalar(let scalar):
                guard !path.isEmpty, !isNull(node) else { return }
                values[AbsoluteConfigKey(path)] = ConfigValue(.string(scalar.string), isSecret: false)
            case .mapping(let mapping):
                for (key, value) in mapping {
                    guard let name = key.string else { continue }
                    walk(value, path + [name])
                }
            case .sequence(let sequence):
                let items = Array(sequence)
                guard !path.isEmpty, items.allSatisfy({ if case .scalar = $0 { true } else { false } }) else { return }
                values[AbsoluteConfigKey(path)] = ConfigValue(.stringArray(items.compactMap { isNull($0) ? nil : $0.string }), isSecret: false)
            case .alias:
                return
            }
        }
        walk(root, [])
        return values
    }
}

extension ChatBridgeConfiguration {
    /// Reads `models`, `personas`, `routes`, `access`, `limits`, `safety`, `bot.timezone` and the other
    /// operator settings into `profiles` and `controls`.
    mutating func readControls(_ r: inout Reader, sections: StructuredSections) {
        // Profiles: `llm.*` is `default`; `models.<name>` inherits what it does not set from it (its keys only
        // when it talks to the same server).
        llm.apiKeys = r.list("llm.api_keys", secret: true) ?? []
        var base = ModelProfile(
            name: "default", settings: llm, apiKeys: llm.apiKeys.isEmpty ? [llm.apiKey] : llm.apiKeys,
            fallback: r.string("llm.fallback"), inputPrice: r.double("llm.price.input", range: 0...1_000_000),
            outputPrice: r.double("llm.price.output", range: 0...1_000_000))
        var profiles: [String: ModelProfile] = [:]
        for name in sections.modelNames {
            let prefix = "models.\(name)"
            guard name.range(of: "^[A-Za-z0-9_-]{1,40}$", options: .regularExpression) != nil else {
                r.error(prefix, "a profile name is letters, digits, '-' and '_' (at most 40)")
                continue
            }
            var settings = name == "default" ? base.settings : llm
            if let provider = r.string("\(prefix).provider") {
                if let value = LLMProvider(rawValue: provider.lowercased()) { settings.provider = value } else {
                    r.error("\(prefix).provider", "must be one of \(LLMProvider.allCases.map(\.rawValue).joined(separator: ", ")), got '\(provider.prefix(60))'")
                }
            }
            let ownURL = r.string("\(prefix).base_url")
            if let ownURL {
                if let url = URLComponents(string: ownURL), let scheme = url.scheme, ["http", "https"].contains(scheme.lowercased()), url.host?.isEmpty == false {
                    settings.baseURL = ownURL
                } else {
                    r.error("\(prefix).base_url", "must be an http(s) URL, got '\(ownURL.prefix(60))'")
                }
            }
            settings.model = r.string("\(prefix).model") ?? settings.model
            settings.apiVersion = r.string("\(prefix).api_version") ?? settings.apiVersion
            settings.temperature = r.double("\(prefix).temperature", range: 0...2) ?? settings.temperature
            settings.maxTokens = r.int("\(prefix).max_tokens", range: 1...1_000_000) ?? settings.maxTokens
            settings.timeout = r.duration("\(prefix).timeout") ?? settings.timeout
            var keys = r.list("\(prefix).api_keys", secret: true) ?? r.string("\(prefix).api_key", secret: true).map { [$0] } ?? []
            if keys.isEmpty && (ownURL == nil || settings.baseURL == llm.baseURL) { keys = base.apiKeys }
            let profile = ModelProfile(
                name: name, settings: settings, apiKeys: keys,
                fallback: r.string("\(prefix).fallback") ?? (name == "default" ? base.fallback : nil),
                inputPrice: r.double("\(prefix).price.input", range: 0...1_000_000) ?? (name == "default" ? base.inputPrice : nil),
                outputPrice: r.double("\(prefix).price.output", range: 0...1_000_000) ?? (name == "default" ? base.outputPrice : nil))
            if name == "default" { base = profile } else { profiles[name] = profile }
        }
        profiles["default"] = base
        for profile in profiles.values.sorted(by: { $0.name < $1.name }) {
            if let fallback = profile.fallback {
                if profiles[fallback] == nil {
                    r.error(profile.name == "default" ? "llm.fallback" : "models.\(profile.name).fallback", "names no profile: '\(fallback.prefix(60))' (profiles: \(profiles.keys.sorted().joined(separator: ", ")))")
                } else if fallback == profile.name {
                    r.error(profile.name == "default" ? "llm.fallback" : "models.\(profile.name).fallback", "a profile cannot fall back to itself")
                }
            }
        }
        self.profiles = profiles.values.sorted { $0.name == "default" ? true : $1.name == "default" ? false : $0.name < $1.name }
        llm.apiKeys = base.apiKeys

        var controls = Controls()
        controls.profiles = self.profiles.map(\.name)
        controls.systemPrompt = engine.systemPrompt
        if let zone = r.string("bot.timezone") {
            if let timeZone = TimeZone(identifier: zone.trimmingCharacters(in: .whitespaces)) { controls.timeZone = timeZone } else {
                r.error("bot.timezone", "must be a time zone name such as Asia/Shanghai, Europe/Berlin or UTC, got '\(zone.prefix(60))'")
            }
        }

        // Personas.
        for name in sections.personaNames {
            guard let prompt = r.string("personas.\(name).prompt") else {
                r.error("personas.\(name).prompt", "not set: a persona needs its prompt")
                continue
            }
            controls.personas.append(Persona(name: name, prompt: prompt, description: r.string("personas.\(name).description") ?? ""))
        }

        // Routes.
        if let problem = sections.routesProblem { r.error("routes", problem) }
        for (index, rule) in sections.routes.enumerated() {
            let key = "routes[\(index)]"
            func strings(_ names: String...) -> Set<String> {
                var values: Set<String> = []
                for name in names {
                    if let one = rule[name] as? String { values.insert(one) }
                    if let one = rule[name] as? Int { values.insert(String(one)) }
                    if let many = rule[name] as? [Any] { values.formUnion(many.map { "\($0)" }) }
                }
                return values
            }
            let known: Set<String> = ["platform", "chat", "chats", "user", "users", "profile", "model", "persona"]
            for field in rule.keys where !known.contains(field) {
                r.error("\(key).\(field)", "unknown field; a rule has platform, chats, users, profile and persona")
            }
            var route = Route(
                platform: (rule["platform"] as? String)?.lowercased(), chats: strings("chat", "chats"), users: strings("user", "users"),
                profile: (rule["profile"] as? String) ?? (rule["model"] as? String), persona: rule["persona"] as? String)
            if let platform = route.platform, !["dingtalk", "lark"].contains(platform) {
                r.error("\(key).platform", "must be dingtalk or lark, got '\(platform.prefix(40))'")
                route.platform = nil
            }
            if let profile = route.profile, !controls.profiles.contains(profile) {
                r.error("\(key).profile", "names no profile: '\(profile.prefix(60))' (profiles: \(controls.profiles.joined(separator: ", ")))")
            }
            if let persona = route.persona, controls.persona(named: persona) == nil {
                r.error("\(key).persona", "names no persona: '\(persona.prefix(60))'")
            }
            if route.profile == nil && route.persona == nil {
                r.warning(key, "chooses neither a profile nor a persona; it changes nothing")
            }
            controls.routes.append(route)
        }

        controls.selectableModels = r.list("conversation.selectable_models") ?? []
        for name in controls.selectableModels where !controls.profiles.contains(name) {
            r.error("conversation.selectable_models", "names no profile: '\(name.prefix(60))' (profiles: \(controls.profiles.joined(separator: ", ")))")
        }
        controls.selectableModels = controls.selectableModels.filter { controls.profiles.contains($0) }
        controls.allowCustomPrompt = r.bool("conversation.allow_custom_prompt") ?? true
        controls.acceptDonatedKeys = r.bool("llm.accept_donated_keys") ?? false
        keyRecheck = r.duration("llm.key_recheck", atLeast: .seconds(60), "1m") ?? keyRecheck

        // Access.
        func ids(_ key: String) -> Set<String> {
            let values = r.list(key) ?? []
            for value in values where !Self.isPlatformID(value) {
                r.error(key, "'\(value.prefix(60))' must be written platform:id, such as dingtalk:0420001 or lark:ou_…")
            }
            return Set(values.filter(Self.isPlatformID).map { value in
                let colon = value.firstIndex(of: ":")!
                return value[..<colon].lowercased() + value[colon...]
            })
        }
        controls.access.admins = ids("access.admins")
        controls.access.allowUsers = ids("access.allow_users")
        controls.access.denyUsers = ids("access.deny_users")
        controls.access.allowChats = ids("access.allow_chats")
        controls.access.denyChats = ids("access.deny_chats")
        controls.access.directChats = r.bool("access.direct_chats") ?? true
        controls.access.groupChats = r.bool("access.group_chats") ?? true

        // Limits: empty (or 0 for the per-minute one) is unlimited.
        if let raw = r.string("limits.user_per_minute") {
            let value = raw.trimmingCharacters(in: .whitespaces).lowercased()
            if ["off", "none", "unlimited"].contains(value) {
                controls.limits.userPerMinute = nil
            } else if let number = r.int("limits.user_per_minute", range: 0...100_000) {
                controls.limits.userPerMinute = number == 0 ? nil : number
            }
        }
        controls.limits.userDailyMessages = r.int("limits.user_daily_messages", range: 1...100_000_000)
        controls.limits.userDailyTokens = r.int("limits.user_daily_tokens", range: 1...Int(Int32.max))
        controls.limits.chatDailyTokens = r.int("limits.chat_daily_tokens", range: 1...Int(Int32.max))

        // Safety.
        var words = r.list("safety.blocked_words") ?? []
        if let path = r.string("safety.blocked_words_file") {
            do {
                let text = try String(contentsOfFile: path, encoding: .utf8)
                words += text.split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty && !$0.hasPrefix("#") }
            } catch {
                r.error("safety.blocked_words_file", "cannot read \(path): \((error as NSError).localizedDescription)")
            }
        }
        controls.safety.blockedWords = BlockedWords(words)
        controls.safety.reply = r.string("safety.reply")
        watchConfig = r.bool("config.watch") ?? true
        self.controls = controls
    }

    static func isPlatformID(_ text: String) -> Bool {
        guard let colon = text.firstIndex(of: ":") else { return false }
        return !text[..<colon].isEmpty && !text[text.index(after: colon)...].isEmpty
    }
}
