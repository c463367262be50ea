import ChatBridgeCore
import ChatBridgeDingTalk
import ChatBridgeLark
import ChatBridgeLLM
import ChatBridgeStore
import Configuration
import Foundation
import Logging
import SystemPackage

/// Everything `chatbridge` reads from its YAML file and environment.
public struct ChatBridgeConfiguration: Sendable {
    public struct Server: Sendable, Equatable {
        public var host = "0.0.0.0"
        public var port = 8080
        public var maxBodyBytes = 1 << 20
        public var drainTimeout: Duration = .seconds(30)
        /// Where `/metrics` is served instead of the main address; nil serves it on the main address.
        public var metricsAddress: ListenAddress?
    }

    /// A `host:port` to listen on (`[::1]:9090` for IPv6).
    public struct ListenAddress: Sendable, Equatable, CustomStringConvertible {
        public var host: String
        public var port: Int
        public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }

        public static func parse(_ text: String) -> ListenAddress? {
            let trimmed = text.trimmingCharacters(in: .whitespaces)
            let host: Substring
            let port: Substring
            if trimmed.hasPrefix("["), let close = trimmed.firstIndex(of: "]") {
                host = trimmed[trimmed.index(after: trimmed.startIndex)..<close]
                let rest = trimmed[trimmed.index(after: close)...]
                guard rest.hasPrefix(":") else { return nil }
                port = rest.dropFirst()
            } else {
                guard let colon = trimmed.lastIndex(of: ":") else { return nil }
                host = trimmed[..<colon]
                port = trimmed[trimmed.index(after: colon)...]
            }
            guard !host.isEmpty, let number = Int(port), (0...65535).contains(number) else { return nil }
            return ListenAddress(host: String(host), port: number)
        }
    }

    public struct Worker: Sendable, Equatable {
        public var concurrency = 64
        public var maxAttempts = 5
        public var lease: Duration = .seconds(30)
        /// The longest `Retry-After` waited for; a provider asking for longer gets the busy reply sent.
        public var maxRetryWait: Duration = .seconds(600)
    }

    public struct Log: Sendable, Equatable {
        public var level: Logger.Level = .info
        public var format: LogFormat = .text
    }

    public enum LogFormat: String, Sendable, CaseIterable { case text, json }

    /// A problem found while reading the configuration.
    public struct Problem: Sendable, Equatable, CustomStringConvertible {
        public enum Severity: String, Sendable { case error, warning }
        public var severity: Severity
        public var key: String
        public var message: String
        public var description: String { "\(severity.rawValue): \(key): \(message)" }
    }

    public var server = Server()
    public var databaseURL = "sqlite:data/chatbridge.sqlite"
    /// PostgreSQL connections per process for answering work (`database.pool_size`); max(2, pool_size ÷ 5) more are kept for acknowledgements and lease renewals, and one listens for wake-ups.
    public var databasePoolSize = 10
    /// `database.url` with its password masked, for logs and `chatbridge check`.
    public var maskedDatabaseURL: String {
        (try? DatabaseLocation.parse(databaseURL))?.description ?? "(invalid)"
    }
    public var llm = LLMSettings()
    /// Every model profile, `default` (from `llm.*`) first.
    public var profiles: [ModelProfile] = []
    /// Access, limits, safety, personas, routes (reloadable).
    public var controls = Controls()
    /// How often a disabled model key is tried again (`llm.key_recheck`).
    public var keyRecheck: Duration = .seconds(3600)
    /// Reload when the configuration file changes (`config.watch`).
    public var watchConfig = true
    public var engine = EngineSettings()
    public var dingtalk = DingTalkSettings()
    public var lark = LarkSettings()
    public var worker = Worker()
    public var log = Log()
    /// Where the file came from, if any.
    public var sourceFile: String?
    public var problems: [Problem] = []

    public var errors: [Problem] { problems.filter { $0.severity == .error } }
    public var warnings: [Problem] { problems.filter { $0.severity == .warning } }

    public init() {}

    public struct LoadError: Error, CustomStringConvertible {
        public var description: String
    }

    /// Reads `file` (or `chatbridge.yaml` when it exists) and the environment; the environment wins.
    public static func load(file: String?, environment: [String: String] = ProcessInfo.processInfo.environment) async throws -> ChatBridgeConfiguration {
        var providers: [any ConfigProvider] = []
        var env: [String: String] = [:]
        for (name, value) in environment where name.hasPrefix("CHATBRIDGE_") {
            env[String(name.dropFirst("CHATBRIDGE_".count))] = value
        }
        providers.append(EnvironmentVariablesProvider(environmentVariables: env, arraySeparator: ","))
        let path = file ?? "chatbridge.yaml"
        var source: String?
        var yamlText: String?
        if file != nil || FileManager.default.fileExists(atPath: path) {
            guard FileManager.default.fileExists(atPath: path) else {
                throw LoadError(description: "configuration file \(path) does not exist")
            }
            do {
                let text = try String(contentsOfFile: path, encoding: .utf8)
                providers.append(InMemoryProvider(name: path, values: try StructuredSections.flatten(yaml: text)))
                yamlText = text
                source = path
            } catch {
                throw LoadError(description: "cannot read configuration file \(path): \(error)")
            }
        }
        let sections: StructuredSections
        do {
            sections = try StructuredSections(yaml: yamlText, dottedKeys: [])
        } catch {
            throw LoadError(description: "cannot read configuration file \(path): \(error)")
        }
        var config = ChatBridgeConfiguration()
        config.sourceFile = source
        config.read(ConfigReader(providers: providers), environment: environment, sections: sections)
        return config
    }

    /// Builds a configuration from explicit key/value pairs (dotted keys), as tests and the bench do.
    public static func from(values: [String: String]) -> ChatBridgeConfiguration {
        var env: [String: String] = [:]
        for (key, value) in values {
            env[key.uppercased().replacingOccurrences(of: ".", with: "_")] = value
        }
        var config = ChatBridgeConfiguration()
        let sections = (try? StructuredSections(yaml: nil, dottedKeys: Array(values.keys))) ?? StructuredSections()
        config.read(ConfigReader(provider: EnvironmentVariablesProvider(environmentVariables: env, arraySeparator: ",")), environment: [:], sections: sections)
        return config
    }

    // MARK: Reading

    private mutating func read(_ reader: ConfigReader, environment: [String: String], sections: StructuredSections) {
        var r = Reader(reader: reader)
        server.host = r.string("server.host") ?? server.host
        server.port = r.int("server.port", range: 0...65535) ?? server.port
        server.maxBodyBytes = r.size("server.max_body_bytes") ?? server.maxBodyBytes
        server.drainTimeout = r.duration("server.drain_timeout") ?? server.drainTimeout
        if let raw = r.string("server.metrics_address") {
            if let address = ListenAddress.parse(raw) { server.metricsAddress = address } else {
                r.error("server.metrics_address", "must be host:port such as 127.0.0.1:9090 or [::1]:9090, got '\(raw.prefix(60))'")
            }
        }

        databaseURL = r.string("database.url") ?? databaseURL
        do {
            _ = try DatabaseLocation.parse(databaseURL)
        } catch {
            r.error("database.url", "\(error)".replacingOccurrences(of: "database.url: ", with: ""))
        }
        databasePoolSize = r.int("database.pool_size", range: 1...1000) ?? databasePoolSize

        if let provider = r.string("llm.provider") {
            if let value = LLMProvider(rawValue: provider.lowercased()) { llm.provider = value } else {
                r.error("llm.provider", "must be one of \(LLMProvider.allCases.map(\.rawValue).joined(separator: ", ")), got '\(provider)'")
            }
        }
        llm.baseURL = r.string("llm.base_url") ?? environment["OPENAI_BASE_URL"].flatMap { $0.isEmpty ? nil : $0 } ?? llm.baseURL
        if let url = URLComponents(string: llm.baseURL), let scheme = url.scheme, ["http", "https"].contains(scheme.lowercased()), url.host?.isEmpty == false {
        } else {
            r.error("llm.base_url", "must be an http(s) URL, got '\(llm.baseURL)'")
        }
        llm.apiKey = r.string("llm.api_key", secret: true) ?? environment["OPENAI_API_KEY"] ?? ""
        llm.model = r.string("llm.model") ?? llm.model
        llm.apiVersion = r.string("llm.api_version") ?? llm.apiVersion
        llm.temperature = r.double("llm.temperature", range: 0...2)
        llm.maxTokens = r.int("llm.max_tokens", range: 1...1_000_000)
        llm.timeout = r.duration("llm.timeout") ?? llm.timeout
        if llm.apiKey.isEmpty {
            r.warning("llm.api_key", "not set (CHATBRIDGE_LLM_API_KEY or OPENAI_API_KEY); only servers that need no key (a local Ollama or vLLM) will answer")
        }

        var settings = EngineSettings()
        if let language = r.string("bot.language") {
            if let value = BotMessages.Language(rawValue: language.lowercased()) { settings.language = value } else {
                r.error("bot.language", "must be zh or en, got '\(language)'")
            }
        }
        settings.messages = .defaults(for: settings.language)
        for name in BotMessages.names {
            if let text = r.string("bot.messages.\(name)") { settings.messages.override(name, with: text) }
        }
        settings.systemPrompt = r.string("llm.system_prompt") ?? settings.systemPrompt
        settings.maxTurns = r.int("conversation.max_turns", range: 0...1000) ?? settings.maxTurns
        settings.maxContextTokens = r.int("conversation.max_context_tokens", range: 100...10_000_000) ?? settings.maxContextTokens
        settings.maxQuestionChars = r.int("conversation.max_question_chars", range: 1...1_000_000) ?? settings.maxQuestionChars
        settings.idleReset = r.duration("conversation.idle_reset") ?? settings.idleReset
        if let scope = r.string("conversation.group_scope") {
            if let value = GroupScope(rawValue: scope.lowercased()) { settings.groupScope = value } else {
                r.error("conversation.group_scope", "must be user or chat, got '\(scope)'")
            }
        }
        settings.resetCommands = r.list("conversation.reset_commands") ?? settings.resetCommands
        settings.helpCommands = r.list("conversation.help_commands") ?? settings.helpCommands
        engine = settings
        readControls(&r, sections: sections)

        dingtalk = DingTalkSettings(
            clientID: r.string("dingtalk.client_id") ?? "",
            clientSecret: r.string("dingtalk.client_secret", secret: true) ?? "",
            robotCode: r.string("dingtalk.robot_code"),
            corpID: r.string("dingtalk.corp_id"),
            apiBaseURL: r.string("dingtalk.api_base_url") ?? "https://api.dingtalk.com",
            webhookHosts: r.list("dingtalk.webhook_hosts") ?? ["oapi.dingtalk.com", "api.dingtalk.com"],
            maxMessageChars: r.int("dingtalk.max_message_chars", range: 200...20000) ?? 4000
        )
        while dingtalk.apiBaseURL.hasSuffix("/") { dingtalk.apiBaseURL.removeLast() }
        if let mode = r.string("dingtalk.mode") {
            if let value = DingTalkSettings.Mode(rawValue: mode.lowercased()) { dingtalk.mode = value } else {
                r.error("dingtalk.mode", "must be stream or http, got '\(mode.prefix(60))'")
            }
        }
        dingtalk.stream.keepaliveTimeout = r.duration("dingtalk.stream.keepalive_timeout", atLeast: .milliseconds(100), "100ms") ?? dingtalk.stream.keepaliveTimeout
        dingtalk.stream.maxBackoff = r.duration("dingtalk.stream.max_backoff", atLeast: .milliseconds(100), "100ms") ?? dingtalk.stream.maxBackoff
        dingtalk.stream.initialBackoff = min(dingtalk.stream.initialBackoff, dingtalk.stream.maxBackoff)
        dingtalk.stream.endpointHosts = r.list("dingtalk.stream.hosts") ?? dingtalk.stream.endpointHosts
        dingtalk.card.templateID = r.string("dingtalk.card.template_id")?.trimmingCharacters(in: .whitespaces) ?? ""
        dingtalk.card.contentKey = r.string("dingtalk.card.content_key")?.trimmingCharacters(in: .whitespaces) ?? dingtalk.card.contentKey
        dingtalk.card.updateInterval = r.duration("dingtalk.card.update_interval", atLeast: .milliseconds(50), "50ms", why: " (DingTalk limits card updates per app)") ?? dingtalk.card.updateInterval
        dingtalk.card.maxQPS = r.int("dingtalk.card.max_qps", range: 1...1000) ?? dingtalk.card.maxQPS
        dingtalk.card.qpsLimitPause = r.duration("dingtalk.card.qps_backoff") ?? dingtalk.card.qpsLimitPause
        if dingtalk.card.isEnabled && !dingtalk.hasOpenAPICredentials {
            r.error("dingtalk.card.template_id", "cards need the OpenAPI: set dingtalk.client_id and dingtalk.client_secret too")
        }
        if dingtalk.mode == .stream && !dingtalk.hasOpenAPICredentials && !dingtalk.clientSecret.isEmpty {
            r.warning("dingtalk.mode", "stream needs dingtalk.client_id as well as dingtalk.client_secret; no Stream connection until both are set")
        }
        if dingtalk.clientSecret.isEmpty {
            r.warning("dingtalk.client_secret", "not set (CHATBRIDGE_DINGTALK_CLIENT_SECRET); DingTalk callbacks are refused with 503 until it is")
        } else if dingtalk.robotCode.isEmpty {
            r.warning("dingtalk.client_id", "not set (CHATBRIDGE_DINGTALK_CLIENT_ID); DingTalk callbacks are refused with 503 until it is, since a message must name this robot")
        } else if dingtalk.clientID.isEmpty {
            r.warning("dingtalk.client_id", "not set; replies can only go through sessionWebhooks, not the OpenAPI fallback")
        }

        readLark(&r)

        worker.concurrency = r.int("worker.concurrency", range: 1...100_000) ?? worker.concurrency
        worker.maxAttempts = r.int("worker.max_attempts", range: 1...100) ?? worker.maxAttempts
        worker.lease = r.duration("worker.lease") ?? worker.lease
        if worker.lease < .seconds(20) {
            r.error("worker.lease", "must be at least 20s: a claim must outlast one reply request to the platform (up to 15s)")
        }
        worker.maxRetryWait = r.duration("worker.max_retry_wait") ?? worker.maxRetryWait

        if let level = r.string("log.level") {
            if let value = Logger.Level(rawValue: level.lowercased()) { log.level = value } else {
                r.error("log.level", "must be one of trace, debug, info, notice, warning, error, critical; got '\(level)'")
            }
        }
        if let format = r.string("log.format") {
            if let value = LogFormat(rawValue: format.lowercased()) { log.format = value } else {
                r.error("log.format", "must be text or json, got '\(format)'")
            }
        }
        problems = r.problems
    }

    private mutating func readLark(_ r: inout Reader) {
        lark.appID = r.string("lark.app_id")?.trimmingCharacters(in: .whitespaces) ?? ""
        lark.appSecret = r.string("lark.app_secret", secret: true) ?? ""
        lark.verificationToken = r.string("lark.verification_token", secret: true) ?? ""
        lark.encryptKey = r.string("lark.encrypt_key", secret: true) ?? ""
        if let base = r.string("lark.base_url") {
            var trimmed = base.trimmingCharacters(in: .whitespaces)
            while trimmed.hasSuffix("/") { trimmed.removeLast() }
            let url = URLComponents(string: trimmed)
            let host = url?.host?.lowercased() ?? ""
            let loopback = ["127.0.0.1", "localhost", "::1"].contains(host)
            if let scheme = url?.scheme?.lowercased(), scheme == "https" || (scheme == "http" && loopback), !host.isEmpty {
                lark.baseURL = trimmed
            } else if url?.scheme?.lowercased() == "http" {
                r.error("lark.base_url", "must use https (the app secret and tokens travel on it); plain http only on loopback, got '\(base.prefix(60))'")
            } else {
                r.error("lark.base_url", "must be an http(s) URL such as https://open.feishu.cn or https://open.larksuite.com, got '\(base.prefix(60))'")
            }
        }
        if let mode = r.string("lark.mode") {
            if let value = LarkSettings.Mode(rawValue: mode.lowercased()) { lark.mode = value } else {
                r.error("lark.mode", "must be websocket or webhook, got '\(mode.prefix(60))'")
            }
        }
        if let reply = r.string("lark.group_reply") {
            if let value = LarkSettings.GroupReply(rawValue: reply.lowercased()) { lark.groupReply = value } else {
                r.error("lark.group_reply", "must be mention or all, got '\(reply.prefix(60))'")
            }
        }
        if let thread = r.string("lark.reply_in_thread") {
            switch thread.lowercased() {
            case "true", "yes", "1", "on": lark.replyInThread = true
            case "false", "no", "0", "off": lark.replyInThread = false
            default: r.error("lark.reply_in_thread", "must be true or false, got '\(thread.prefix(60))'")
            }
        }
        if let mode = r.string("lark.card.mode") {
            if let value = LarkSettings.CardMode(rawValue: mode.lowercased()) { lark.cardMode = value } else {
                r.error("lark.card.mode", "must be cardkit, patch or off, got '\(mode.prefix(60))'")
            }
        }
        lark.cardUpdateInterval = r.duration("lark.card.update_interval", atLeast: .milliseconds(100), "100ms", why: " (Feishu limits updates per card and per message)") ?? lark.cardUpdateInterval
        lark.stream.hosts = r.list("lark.stream.hosts") ?? lark.stream.hosts
        lark.stream.keepaliveTimeout = r.duration("lark.stream.keepalive_timeout", atLeast: .milliseconds(100), "100ms") ?? lark.stream.keepaliveTimeout
        lark.stream.maxBackoff = r.duration("lark.stream.max_backoff", atLeast: .milliseconds(100), "100ms") ?? lark.stream.maxBackoff
        lark.stream.initialBackoff = min(lark.stream.initialBackoff, lark.stream.maxBackoff)
        guard lark.isEnabled else {
            if !lark.appSecret.isEmpty { r.warning("lark.app_id", "lark.app_secret is set but lark.app_id is not; Lark stays off until it is") }
            return
        }
        if lark.appSecret.isEmpty {
            r.error("lark.app_secret", "not set (CHATBRIDGE_LARK_APP_SECRET): Lark needs the app secret to fetch tokens and reply")
        }
        if lark.mode == .webhook, let problem = lark.webhookConfigurationProblem {
            r.warning("lark.mode", problem + "; until then /callbacks/lark answers 503")
        } else if lark.mode == .webhook, lark.encryptKey.isEmpty {
            r.warning(
                "lark.encrypt_key",
                "not set: webhook events arrive unencrypted and unsigned, checked by the verification token alone; set the app's Encrypt Key (Events & Callbacks) so every event is signed")
        }
    }

    /// The effective settings, one `key = value` line each, with secrets masked.
    public func effectiveSettings() -> [(key: String, value: String)] {
        func mask(_ secret: String) -> String { Self.masked(secret) }
        func seconds(_ d: Duration) -> String { "\(Int(d.seconds))s" }
        let head: [(key: String, value: String)] = [
            ("server.host", server.host), ("server.port", "\(server.port)"), ("server.max_body_bytes", "\(server.maxBodyBytes)"),
            ("server.drain_timeout", seconds(server.drainTimeout)),
            ("server.metrics_address", server.metricsAddress.map(\.description) ?? "(on the main address)"),
            ("database.url", maskedDatabaseURL), ("database.pool_size", "\(databasePoolSize)"),
            ("llm.provider", llm.provider.rawValue), ("llm.base_url", llm.baseURL), ("llm.api_key", mask(llm.apiKey)),
            ("llm.model", llm.model), ("llm.api_version", llm.apiVersion),
            ("llm.temperature", llm.temperature.map { "\($0)" } ?? "(model default)"),
            ("llm.max_tokens", llm.maxTokens.map { "\($0)" } ?? "(model default)"),
            ("llm.timeout", seconds(llm.timeout)), ("llm.system_prompt", engine.systemPrompt),
            ("conversation.max_turns", "\(engine.maxTurns)"), ("conversation.max_context_tokens", "\(engine.maxContextTokens)"),
            ("conversation.max_question_chars", "\(engine.maxQuestionChars)"),
            ("conversation.idle_reset", seconds(engine.idleReset)), ("conversation.group_scope", engine.groupScope.rawValue),
            ("conversation.reset_commands", engine.resetCommands.joined(separator: ", ")),
            ("conversation.help_commands", engine.helpCommands.joined(separator: ", ")),
            ("bot.language", engine.language.rawValue),
            ("dingtalk.client_id", dingtalk.clientID.isEmpty ? "(not set)" : dingtalk.clientID),
            ("dingtalk.client_secret", mask(dingtalk.clientSecret)), ("dingtalk.robot_code", dingtalk.robotCode.isEmpty ? "(not set)" : dingtalk.robotCode),
            ("dingtalk.corp_id", dingtalk.corpID ?? "(not checked)"),
            ("dingtalk.api_base_url", dingtalk.apiBaseURL), ("dingtalk.webhook_hosts", dingtalk.webhookHosts.joined(separator: ", ")),
            ("dingtalk.max_message_chars", "\(dingtalk.maxMessageChars)"),
            ("dingtalk.mode", dingtalk.mode.rawValue),
            ("dingtalk.stream.keepalive_timeout", "\(dingtalk.stream.keepaliveTimeout)"),
            ("dingtalk.stream.max_backoff", seconds(dingtalk.stream.maxBackoff)),
            ("dingtalk.stream.hosts", dingtalk.stream.endpointHosts.joined(separator: ", ")),
            ("dingtalk.card.template_id", dingtalk.card.templateID.isEmpty ? "(none: markdown replies)" : dingtalk.card.templateID),
            ("dingtalk.card.content_key", dingtalk.card.contentKey),
            ("dingtalk.card.update_interval", "\(dingtalk.card.updateInterval)"),
            ("dingtalk.card.max_qps", "\(dingtalk.card.maxQPS)"),
            ("dingtalk.card.qps_backoff", "\(dingtalk.card.qpsLimitPause)"),
            ("lark.app_id", lark.appID.isEmpty ? "(not set: Lark off)" : lark.appID), ("lark.app_secret", mask(lark.appSecret)),
            ("lark.verification_token", mask(lark.verificationToken)), ("lark.encrypt_key", mask(lark.encryptKey)),
            ("lark.base_url", lark.baseURL), ("lark.mode", lark.mode.rawValue), ("lark.group_reply", lark.groupReply.rawValue),
            ("lark.reply_in_thread", "\(lark.replyInThread)"), ("lark.card.mode", lark.cardMode.rawValue),
            ("lark.card.update_interval", "\(lark.cardUpdateInterval)"), ("lark.stream.hosts", lark.stream.hosts.joined(separator: ", ")),
            ("lark.stream.keepalive_timeout", "\(lark.stream.keepaliveTimeout)"), ("lark.stream.max_backoff", seconds(lark.stream.maxBackoff)),
            ("llm.api_keys", "\(profiles.first?.apiKeys.count ?? 0) key(s)"), ("llm.fallback", profiles.first?.fallback ?? "(none)"),
            ("llm.accept_donated_keys", "\(controls.acceptDonatedKeys)"), ("llm.key_recheck", seconds(keyRecheck)),
        ]
        let models: [(key: String, value: String)] = profiles.dropFirst().map(Self.describe)
        let rest: [(key: String, value: String)] = [
            ("personas", controls.personas.isEmpty ? "(none)" : controls.personas.map(\.name).joined(separator: ", ")),
            ("routes", "\(controls.routes.count) rule(s)"),
            ("conversation.selectable_models", controls.selectableModels.isEmpty ? "(none: /model off)" : controls.selectableModels.joined(separator: ", ")),
            ("conversation.allow_custom_prompt", "\(controls.allowCustomPrompt)"),
            ("access.admins", controls.access.admins.sorted().joined(separator: ", ")),
            ("access.allow_users", controls.access.allowUsers.isEmpty ? "(everyone)" : "\(controls.access.allowUsers.count) user(s)"),
            ("access.deny_users", "\(controls.access.denyUsers.count) user(s)"),
            ("access.allow_chats", controls.access.allowChats.isEmpty ? "(every group)" : "\(controls.access.allowChats.count) chat(s)"),
            ("access.deny_chats", "\(controls.access.denyChats.count) chat(s)"),
            ("access.direct_chats", "\(controls.access.directChats)"), ("access.group_chats", "\(controls.access.groupChats)"),
            ("limits.user_per_minute", controls.limits.userPerMinute.map { "\($0)" } ?? "(unlimited)"),
            ("limits.user_daily_messages", controls.limits.userDailyMessages.map { "\($0)" } ?? "(unlimited)"),
            ("limits.user_daily_tokens", controls.limits.userDailyTokens.map { "\($0)" } ?? "(unlimited)"),
            ("limits.chat_daily_tokens", controls.limits.chatDailyTokens.map { "\($0)" } ?? "(unlimited)"),
            ("safety.blocked_words", "\(controls.safety.blockedWords.count) word(s)"),
            ("bot.timezone", controls.timeZone.identifier), ("config.watch", "\(watchConfig)"),
            ("worker.concurrency", "\(worker.concurrency)"), ("worker.max_attempts", "\(worker.maxAttempts)"), ("worker.lease", seconds(worker.lease)),
            ("worker.max_retry_wait", seconds(worker.maxRetryWait)),
            ("log.level", log.level.rawValue), ("log.format", log.format.rawValue),
        ]
        return head + models + rest
    }

    /// One line for a model profile: where, which model, how many keys (never any of them), fallback, price.
    static func describe(_ profile: ModelProfile) -> (key: String, value: String) {
        var value = "\(profile.settings.provider.rawValue) \(profile.settings.baseURL) model \(profile.settings.model), \(profile.apiKeys.count) key(s)"
        if let fallback = profile.fallback { value += ", fallback \(fallback)" }
        if profile.inputPrice != nil || profile.outputPrice != nil {
            value += ", price \(profile.inputPrice ?? 0)/\(profile.outputPrice ?? 0) per 1M tokens"
        }
        return ("models.\(profile.name)", value)
    }
}

extension ChatBridgeConfiguration {
    /// How a secret is shown: never any of its characters, only that it is set and its length class.
    public static func masked(_ secret: String) -> String {
        switch secret.count {
        case 0: "(not set)"
        case ..<16: "(set, fewer than 16 characters)"
        case ..<32: "(set, 16 to 31 characters)"
        case ..<64: "(set, 32 to 63 characters)"
        default: "(set, 64 characters or more)"
        }
    }
}

/// Reads typed values and collects one problem per bad value.
struct Reader {
    let reader: ConfigReader
    var problems: [ChatBridgeConfiguration.Problem] = []

    init(reader: ConfigReader) { self.reader = reader }

    mutating func error(_ key: String, _ message: String) { problems.append(.init(severity: .error, key: key, message: message)) }
    mutating func warning(_ key: String, _ message: String) { problems.append(.init(severity: .warning, key: key, message: message)) }

    func string(_ key: String, secret: Bool = false) -> String? {
        guard let value = reader.string(forKey: ConfigKey(key), isSecret: secret) else { return nil }
        let trimmed = value.trimmingCharacters(in: .whitespacesAndNewlines)
        return trimmed.isEmpty ? nil : value
    }

    func list(_ key: String, secret: Bool = false) -> [String]? {
        if let array = reader.stringArray(forKey: ConfigKey(key), isSecret: secret) {
            let cleaned = array.map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
            return cleaned.isEmpty ? nil : cleaned
        }
        guard let value = string(key, secret: secret) else { return nil }
        let cleaned = value.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        return cleaned.isEmpty ? nil : cleaned
    }

    mutating func bool(_ key: String) -> Bool? {
        guard let raw = string(key) else { return nil }
        switch raw.trimmingCharacters(in: .whitespaces).lowercased() {
        case "true", "yes", "1", "on": return true
        case "false", "no", "0", "off": return false
        default:
            error(key, "must be true or false, got '\(raw.prefix(60))'")
            return nil
        }
    }

    mutating func int(_ key: String, range: ClosedRange<Int>) -> Int? {
        guard let raw = string(key) else { return nil }
        guard let value = Int(raw.trimmingCharacters(in: .whitespaces).replacingOccurrences(of: "_", with: "")) else {
            error(key, "must be a whole number, got '\(raw.prefix(60))'")
            return nil
        }
        guard range.contains(value) else {
            error(key, "must be between \(range.lowerBound) and \(range.upperBound), got \(value)")
            return nil
        }
        return value
    }

    mutating func double(_ key: String, range: ClosedRange<Double>) -> Double? {
        guard let raw = string(key) else { return nil }
        guard let value = Double(raw.trimmingCharacters(in: .whitespaces)), range.contains(value) else {
            error(key, "must be a number between \(range.lowerBound) and \(range.upperBound), got '\(raw.prefix(60))'")
            return nil
        }
        return value
    }

    mutating func duration(_ key: String) -> Duration? {
        guard let raw = string(key) else { return nil }
        guard let value = DurationParser.parse(raw), value >= .zero else {
            error(key, "must be a duration between 0 and 1000 days, such as 30s, 5m, 1h or 500ms; got '\(raw.prefix(60))'")
            return nil
        }
        return value
    }

    /// A duration of at least `minimum` (written `minimumText` in the message); a shorter one is an error
    /// and nil, so the default stays.
    mutating func duration(_ key: String, atLeast minimum: Duration, _ minimumText: String, why: String = "") -> Duration? {
        guard let value = duration(key) else { return nil }
        guard value >= minimum else {
            error(key, "must be at least \(minimumText)\(why)")
            return nil
        }
        return value
    }

    mutating func size(_ key: String) -> Int? {
        guard let raw = string(key) else { return nil }
        guard let value = SizeParser.parse(raw), value > 0 else {
            error(key, "must be a size between 1 byte and 1 GiB, such as 1048576, 512KiB or 1MiB; got '\(raw.prefix(60))'")
            return nil
        }
        return value
    }
}

/// Parses `500ms`, `30s`, `5m`, `1h`, `1h30m` or a bare number of seconds. Anything that is not a finite,
/// non-negative duration of at most 1000 days (`1e300`, `inf`, `nan`, `-5s`) is nil, never a crash.
public enum DurationParser {
    static let maxMilliseconds = 1000.0 * 86_400_000

    public static func parse(_ text: String) -> Duration? {
        let s = text.trimmingCharacters(in: .whitespaces).lowercased()
        guard !s.isEmpty, s.count <= 64 else { return nil }
        if let seconds = Double(s) { return milliseconds(seconds * 1000) }
        var total = 0.0
        var number = ""
        var unit = ""
        var matched = false
        func flush() -> Bool {
            guard let value = Double(number) else { return false }
            let ms: Double
            switch unit {
            case "ms": ms = value
            case "s", "sec": ms = value * 1000
            case "m", "min": ms = value * 60_000
            case "h": ms = value * 3_600_000
            case "d": ms = value * 86_400_000
            default: return false
            }
            total += ms
            number = ""
            unit = ""
            matched = true
            return true
        }
        for char in s {
            if char.isASCII && (char.isNumber || char == ".") {
                if !unit.isEmpty { guard flush() else { return nil } }
                number.append(char)
            } else if char.isASCII && char.isLetter {
                unit.append(char)
            } else {
                return nil
            }
        }
        if !number.isEmpty || !unit.isEmpty { guard flush() else { return nil } }
        return matched ? milliseconds(total) : nil
    }

    private static func milliseconds(_ value: Double) -> Duration? {
        guard value.isFinite, value >= 0, value <= maxMilliseconds else { return nil }
        return .milliseconds(Int64(value))
    }
}

/// Parses a byte count: `1048576`, `512KiB`, `1MiB`, `1MB`, `2k`. Anything that is not a finite size
/// between 0 and 1 GiB is nil, never a crash.
public enum SizeParser {
    static let maxBytes = Double(1 << 30)

    public static func parse(_ text: String) -> Int? {
        let s = text.trimmingCharacters(in: .whitespaces).lowercased().replacingOccurrences(of: "_", with: "")
        guard s.count <= 64 else { return nil }
        let digits = s.prefix(while: { $0.isASCII && ($0.isNumber || $0 == ".") })
        guard let value = Double(digits) else { return nil }
        let multiplier: Double
        switch s.dropFirst(digits.count).trimmingCharacters(in: .whitespaces) {
        case "", "b": multiplier = 1
        case "k", "kb", "kib": multiplier = 1024
        case "m", "mb", "mib": multiplier = 1024 * 1024
        case "g", "gb", "gib": multiplier = 1024 * 1024 * 1024
        default: return nil
        }
        let bytes = value * multiplier
        guard bytes.isFinite, bytes >= 0, bytes <= maxBytes else { return nil }
        return Int(bytes)
    }
}
