import ChatBridgeCore
import ChatBridgeLLM
import Foundation
import Logging
import ServiceLifecycle
import Synchronization
import UnixSignals

/// Reloads the operator controls and model profiles without a restart: on SIGHUP, and when the
/// configuration file changes (`config.watch`). A configuration with errors is rejected (each problem is
/// logged) and the running one kept; a change to a setting that needs a restart is named in the log.
public final class ConfigReloader: Service, Sendable {
    public enum Outcome: Sendable, Equatable {
        case applied(needsRestart: [String])
        case rejected(problems: [String])
        case unchanged
    }

    private let file: String?
    private let environment: [String: String]
    private let running: Mutex<ChatBridgeConfiguration>
    private let controls: ControlsBox
    private let models: ModelRouter
    private let logger: Logger
    private let pollInterval: Duration
    private let reloads = Mutex(0)
    /// Reloads are numbered as they start; one that started earlier never replaces a later one's result.
    private let generations = Mutex((started: 0, applied: 0))
    /// The file as it was at start, so a change made right after is noticed.
    private let initialStamp: String?

    public init(
        configuration: ChatBridgeConfiguration, environment: [String: String] = ProcessInfo.processInfo.environment,
        controls: ControlsBox, models: ModelRouter, pollInterval: Duration = .seconds(2), logger: Logger
    ) {
        file = configuration.sourceFile
        self.environment = environment
        running = Mutex(configuration)
        self.controls = controls
        self.models = models
        self.pollInterval = pollInterval
        self.logger = logger
        initialStamp = configuration.sourceFile.map(Self.stamp)
    }

    /// How many reloads were applied.
    public var appliedCount: Int { reloads.withLock { $0 } }

    public func run() async throws {
        let watch = running.withLock { $0.watchConfig } && file != nil
        await withDiscardingTaskGroup { group in
            group.addTask {
                let signals = await UnixSignalsSequence(trapping: .sighup)
                for await _ in signals {
                    _ = await self.reload(because: "SIGHUP")
                }
            }
            if watch, let file = self.file {
                group.addTask {
                    var last = self.initialStamp ?? Self.stamp(file)
                    while !Task.isCancelled {
                        try? await Task.sleep(for: self.pollInterval)
                        let now = Self.stamp(file)
                        if now != last {
                            last = now
                            _ = await self.reload(because: "the configuration file changed")
                        }
                    }
                }
            }
            try? await gracefulShutdown()
            group.cancelAll()
        }
    }

    /// The file's modification time and size, to notice a change.
    private static func stamp(_ path: String) -> String {
        guard let attributes = try? FileManager.default.attributesOfItem(atPath: path) else { return "missing" }
        let date = (attributes[.modificationDate] as? Date)?.timeIntervalSince1970 ?? 0
        return "\(date)/\(attributes[.size] ?? 0)"
    }

    /// Reads the configuration again and applies what can change while running.
    @discardableResult
    public func reload(because reason: String) async -> Outcome {
        let generation = generations.withLock { state -> Int in
            state.started += 1
            return state.started
        }
        let next: ChatBridgeConfiguration
        do {
            next = try await ChatBridgeConfiguration.load(file: file, environment: environment)
        } catch {
            logger.error("configuration reload rejected; the running configuration stays", metadata: ["why": "\(reason)", "error": "\(error)"])
            return .rejected(problems: ["\(error)"])
        }
        guard next.errors.isEmpty else {
            for problem in next.errors {
                logger.error("configuration reload rejected: \(problem)")
            }
            logger.error("configuration reload rejected; the running configuration stays", metadata: [
                "why": "\(reason)", "errors": "\(next.errors.count)",
            ])
            return .rejected(problems: next.errors.map(\.description))
        }
        let previous = running.withLock { $0 }
        let before = Dictionary(previous.effectiveSettings().map { ($0.key, $0.value) }, uniquingKeysWith: { $1 })
        let after = Dictionary(next.effectiveSettings().map { ($0.key, $0.value) }, uniquingKeysWith: { $1 })
        let changed = Set(before.keys).union(after.keys).filter { before[$0] != after[$0] }.sorted()
        let needsRestart = changed.filter { !Self.isReloadable($0) }
        let sameControls = previous.profiles == next.profiles && previous.controls == next.controls
        let newest = generations.withLock { state -> Bool in
            guard generation > state.applied else { return false }
            state.applied = generation
            // Applied under the same lock, so two reloads cannot interleave their halves.
            controls.replace(with: next.controls)
            models.replace(profiles: next.profiles)
            return true
        }
        guard newest else {
            logger.info("configuration reload superseded by a later one", metadata: ["why": "\(reason)"])
            return .unchanged
        }
        if changed.isEmpty && sameControls {
            logger.info("configuration reloaded: nothing changed", metadata: ["why": "\(reason)"])
            return .unchanged
        }
        running.withLock { state in
            // Only what was applied counts as running; restart-only settings keep their old values here.
            state.controls = next.controls
            state.profiles = next.profiles
            state.llm = next.llm
        }
        reloads.withLock { $0 += 1 }
        logger.notice("configuration reloaded", metadata: [
            "why": "\(reason)", "profiles": "\(next.profiles.map(\.name).joined(separator: ","))",
            "personas": "\(next.controls.personas.count)", "routes": "\(next.controls.routes.count)",
            "blocked_words": "\(next.controls.safety.blockedWords.count)",
        ])
        for key in needsRestart {
            logger.warning("changed setting takes effect only after a restart", metadata: ["key": "\(key)"])
        }
        return .applied(needsRestart: needsRestart)
    }

    /// Settings a reload applies: model profiles, personas, routes, access, limits, safety.
    static func isReloadable(_ key: String) -> Bool {
        let sections = ["llm", "models", "personas", "routes", "access", "limits", "safety", "bot.timezone", "conversation.selectable_models",
                        "conversation.allow_custom_prompt"]
        // Read once at start: the HTTP client's read timeout, the re-check period, the file watch.
        if ["llm.timeout", "llm.key_recheck"].contains(key) { return false }
        return sections.contains { key == $0 || key.hasPrefix($0 + ".") }
    }
}

/// Tries disabled model keys again every minute (each one once per `llm.key_recheck`).
struct KeyRecheckService: Service {
    let models: ModelRouter
    let interval: Duration

    func run() async throws {
        await withDiscardingTaskGroup { group in
            group.addTask {
                while !Task.isCancelled {
                    await models.recheckDisabledKeys()
                    try? await Task.sleep(for: interval)
                }
            }
            try? await gracefulShutdown()
            group.cancelAll()
        }
    }
}
