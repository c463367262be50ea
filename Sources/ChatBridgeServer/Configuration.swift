import ChatBridgeCore
import ChatBridgeDingTalk
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
    }

    public struct Worker: Sendable, Equatable {
        public var concurrency = 64
        public var maxAttempts = 5
        public var lease: Duration = .seconds(30)
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
    public var llm = LLMSettings()
    public var engine = EngineSettings()
    public var dingtalk = DingTalkSettings()
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
        if file != nil || FileManager.default.fileExists(atPath: path) {
            guard FileManager.default.fileExists(atPath: path) else {
                throw LoadError(description: "configuration file \(path) does not exist")
            }
            do {
                providers.append(try await FileProvider<YAMLSnapshot>(filePath: FilePath(path)))
                source = path
            } catch {
                throw LoadError(description: "cannot read configuration file \(path): \(error)")
            }
        }
        var config = ChatBridgeConfiguration()
        config.sourceFile = source
        config.read(ConfigReader(providers: providers), environment: environment)
        return config
    }

    /// Builds a configuration from explicit key/value pairs (dotted keys), as tests and the bench do.
    public static func from(values: [String: String]) -> ChatBridgeConfiguration {
        var env: [String: String] = [:]
        for (key, value) in values {
            env[key.uppercased().replacingOccurrences(of: ".", with: "_")] = value
        }
        var config = ChatBridgeConfiguration()
        config.read(ConfigReader(provider: EnvironmentVariablesProvider(environmentVariables: env)), environment: [:])
        return config
    }

    // MARK: Reading

    private mutating func read(_ reader: ConfigReader, environment: [String: String]) {
        var r = Reader(reader: reader)
        server.host = r.string("server.host") ?? server.host
        server.port = r.int("server.port", range: 0...65535) ?? server.port
        server.maxBodyBytes = r.size("server.max_body_bytes") ?? server.maxBodyBytes
        server.drainTimeout = r.duration("server.drain_timeout") ?? server.drainTimeout

        databaseURL = r.string("database.url") ?? databaseURL
        do {
            _ = try DatabaseLocation.parse(databaseURL)
        } catch {
            r.error("database.url", "\(error)".replacingOccurrences(of: "database.url: ", with: ""))
        }

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
        settings.idleReset = r.duration("conversation.idle_reset") ?? settings.idleReset
        if let scope = r.string("conversation.group_scope") {
            if let value = GroupScope(rawValue: scope.lowercased()) { settings.groupScope = value } else {
                r.error("conversation.group_scope", "must be user or chat, got '\(scope)'")
            }
        }
        settings.resetCommands = r.list("conversation.reset_commands") ?? settings.resetCommands
        settings.helpCommands = r.list("conversation.help_commands") ?? settings.helpCommands
        engine = settings

        dingtalk = DingTalkSettings(
            clientID: r.string("dingtalk.client_id") ?? "",
            clientSecret: r.string("dingtalk.client_secret", secret: true) ?? "",
            robotCode: r.string("dingtalk.robot_code"),
            apiBaseURL: r.string("dingtalk.api_base_url") ?? "https://api.dingtalk.com",
            webhookHosts: r.list("dingtalk.webhook_hosts") ?? ["oapi.dingtalk.com", "api.dingtalk.com"],
            maxMessageChars: r.int("dingtalk.max_message_chars", range: 200...20000) ?? 4000
        )
        while dingtalk.apiBaseURL.hasSuffix("/") { dingtalk.apiBaseURL.removeLast() }
        if dingtalk.clientSecret.isEmpty {
            r.warning("dingtalk.client_secret", "not set (CHATBRIDGE_DINGTALK_CLIENT_SECRET); DingTalk callbacks are refused with 503 until it is")
        } else if dingtalk.clientID.isEmpty {
            r.warning("dingtalk.client_id", "not set; replies can only go through sessionWebhooks, not the OpenAPI fallback")
        }

        worker.concurrency = r.int("worker.concurrency", range: 1...100_000) ?? worker.concurrency
        worker.maxAttempts = r.int("worker.max_attempts", range: 1...100) ?? worker.maxAttempts
        worker.lease = r.duration("worker.lease") ?? worker.lease
        if worker.lease < .seconds(1) { r.error("worker.lease", "must be at least 1s") }

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

    /// The effective settings, one `key = value` line each, with secrets masked.
    public func effectiveSettings() -> [(key: String, value: String)] {
        func mask(_ secret: String) -> String {
            secret.isEmpty ? "(not set)" : (secret.count > 8 ? "\(secret.prefix(3))…\(secret.suffix(2)) (set, \(secret.count) chars)" : "*** (set)")
        }
        func seconds(_ d: Duration) -> String { "\(Int(d.seconds))s" }
        return [
            ("server.host", server.host), ("server.port", "\(server.port)"), ("server.max_body_bytes", "\(server.maxBodyBytes)"),
            ("server.drain_timeout", seconds(server.drainTimeout)),
            ("database.url", databaseURL),
            ("llm.provider", llm.provider.rawValue), ("llm.base_url", llm.baseURL), ("llm.api_key", mask(llm.apiKey)),
            ("llm.model", llm.model), ("llm.api_version", llm.apiVersion),
            ("llm.temperature", llm.temperature.map { "\($0)" } ?? "(model default)"),
            ("llm.max_tokens", llm.maxTokens.map { "\($0)" } ?? "(model default)"),
            ("llm.timeout", seconds(llm.timeout)), ("llm.system_prompt", engine.systemPrompt),
            ("conversation.max_turns", "\(engine.maxTurns)"), ("conversation.max_context_tokens", "\(engine.maxContextTokens)"),
            ("conversation.idle_reset", seconds(engine.idleReset)), ("conversation.group_scope", engine.groupScope.rawValue),
            ("conversation.reset_commands", engine.resetCommands.joined(separator: ", ")),
            ("conversation.help_commands", engine.helpCommands.joined(separator: ", ")),
            ("bot.language", engine.language.rawValue),
            ("dingtalk.client_id", dingtalk.clientID.isEmpty ? "(not set)" : dingtalk.clientID),
            ("dingtalk.client_secret", mask(dingtalk.clientSecret)), ("dingtalk.robot_code", dingtalk.robotCode.isEmpty ? "(not set)" : dingtalk.robotCode),
            ("dingtalk.api_base_url", dingtalk.apiBaseURL), ("dingtalk.webhook_hosts", dingtalk.webhookHosts.joined(separator: ", ")),
            ("dingtalk.max_message_chars", "\(dingtalk.maxMessageChars)"),
            ("worker.concurrency", "\(worker.concurrency)"), ("worker.max_attempts", "\(worker.maxAttempts)"), ("worker.lease", seconds(worker.lease)),
            ("log.level", log.level.rawValue), ("log.format", log.format.rawValue),
        ]
    }
}

/// Reads typed values and collects one problem per bad value.
private struct Reader {
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

    func list(_ key: String) -> [String]? {
        if let array = reader.stringArray(forKey: ConfigKey(key)) {
            let cleaned = array.map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
            return cleaned.isEmpty ? nil : cleaned
        }
        guard let value = string(key) else { return nil }
        let cleaned = value.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        return cleaned.isEmpty ? nil : cleaned
    }

    mutating func int(_ key: String, range: ClosedRange<Int>) -> Int? {
        guard let raw = string(key) else { return nil }
        guard let value = Int(raw.trimmingCharacters(in: .whitespaces).replacingOccurrences(of: "_", with: "")) else {
            error(key, "must be a whole number, got '\(raw)'")
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
            error(key, "must be a number between \(range.lowerBound) and \(range.upperBound), got '\(raw)'")
            return nil
        }
        return value
    }

    mutating func duration(_ key: String) -> Duration? {
        guard let raw = string(key) else { return nil }
        guard let value = DurationParser.parse(raw), value >= .zero else {
            error(key, "must be a duration such as 30s, 5m, 1h or 500ms; got '\(raw)'")
            return nil
        }
        return value
    }

    mutating func size(_ key: String) -> Int? {
        guard let raw = string(key) else { return nil }
        guard let value = SizeParser.parse(raw), value > 0 else {
            error(key, "must be a size such as 1048576, 512KiB or 1MiB; got '\(raw)'")
            return nil
        }
        return value
    }
}

/// Parses `500ms`, `30s`, `5m`, `1h`, `1h30m` or a bare number of seconds.
public enum DurationParser {
    public static func parse(_ text: String) -> Duration? {
        let s = text.trimmingCharacters(in: .whitespaces).lowercased()
        if let seconds = Double(s) { return .milliseconds(Int64(seconds * 1000)) }
        var total: Duration = .zero
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
            total += .milliseconds(Int64(ms))
            number = ""
            unit = ""
            matched = true
            return true
        }
        for char in s {
            if char.isNumber || char == "." {
                if !unit.isEmpty { guard flush() else { return nil } }
                number.append(char)
            } else if char.isLetter {
                unit.append(char)
            } else {
                return nil
            }
        }
        if !number.isEmpty || !unit.isEmpty { guard flush() else { return nil } }
        return matched ? total : nil
    }
}

/// Parses a byte count: `1048576`, `512KiB`, `1MiB`, `1MB`, `2k`.
public enum SizeParser {
    public static func parse(_ text: String) -> Int? {
        let s = text.trimmingCharacters(in: .whitespaces).lowercased().replacingOccurrences(of: "_", with: "")
        let digits = s.prefix(while: { $0.isNumber || $0 == "." })
        guard let value = Double(digits) else { return nil }
        let multiplier: Double
        switch s.dropFirst(digits.count).trimmingCharacters(in: .whitespaces) {
        case "", "b": multiplier = 1
        case "k", "kb", "kib": multiplier = 1024
        case "m", "mb", "mib": multiplier = 1024 * 1024
        case "g", "gb", "gib": multiplier = 1024 * 1024 * 1024
        default: return nil
        }
        return Int(value * multiplier)
    }
}
