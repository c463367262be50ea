import ArgumentParser
import AsyncHTTPClient
import ChatBridgeCore
import ChatBridgeHTTP
import ChatBridgeLLM
import ChatBridgeServer
import ChatBridgeStore
import Foundation
import Logging
import Synchronization

struct Chat: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Chat with the configured model in the terminal, through the same engine, store and commands.",
        discussion: "Answers stream to standard output as they arrive. /reset starts over and /help lists the commands. With standard input not a terminal (echo \"question\" | chatbridge chat) it answers once and exits: status 0 on success, 1 with a one-line error otherwise. The conversation is kept in the configured database (platform 'cli', user = your login name); with SQLite stop a running server first (PostgreSQL is shared), or point this command at another database with CHATBRIDGE_DATABASE_URL."
    )

    @OptionGroup var options: ConfigOption

    func run() async throws {
        let configuration = try await options.load()
        if let problem = configuration.errors.first { throw CleanExit.failure("\(problem)") }
        var logger = Logger(label: "chatbridge")
        logger.logLevel = .critical
        let store: SQLStore
        do {
            store = try await SQLStore.open(try DatabaseLocation.parse(configuration.databaseURL), logger: logger)
        } catch {
            throw CleanExit.failure("\(error)")
        }
        let client = OutboundHTTP.makeClient(readTimeout: .seconds(Int64(max(configuration.llm.timeout.seconds, 30))))
        let model = ModelRouter(profiles: configuration.profiles, store: store, client: client, logger: logger)
        // The operator at the terminal: personas, routes, models and blocked words apply; access rules and
        // limits (for chat users) do not.
        var controls = configuration.controls
        controls.access = AccessRules()
        controls.limits = Limits()
        let engine = Engine(
            settings: configuration.engine, model: model, conversations: store, clock: SystemClock(), controls: ControlsBox(controls), logger: logger)
        let user = ProcessInfo.processInfo.environment["USER"] ?? ProcessInfo.processInfo.userName
        let interactive = isatty(STDIN_FILENO) == 1
        var failed = false
        if interactive {
            print("ChatBridge terminal chat with \(configuration.llm.model). \(engine.settings.helpCommands.first ?? "/help") for help, Ctrl-D to quit.")
            while true {
                FileHandle.standardOutput.write(Data("> ".utf8))
                guard let line = readLine() else { break }
                if line.trimmingCharacters(in: .whitespaces).isEmpty { continue }
                if await !ask(line, engine: engine, store: store, user: user) { failed = true }
            }
        } else {
            var input = ""
            while let line = readLine(strippingNewline: false) { input += line }
            failed = await !ask(input, engine: engine, store: store, user: user)
        }
        try? await client.shutdown()
        await store.close()
        if failed && !interactive { throw ExitCode(1) }
    }

    /// Answers one line; returns false on failure (after printing a one-line error).
    private func ask(_ text: String, engine: Engine, store: SQLStore, user: String) async -> Bool {
        let message = InboundMessage(
            platform: "cli", botID: "terminal", messageID: UUID().uuidString,
            chat: .init(id: user, kind: .direct), sender: .init(id: user, name: user),
            body: .text(text), sentAt: Date())
        // The terminal is a live reply like a card: the same seam the dispatcher feeds, without pacing.
        let terminal = TerminalReply()
        do {
            try await terminal.open(resuming: false)
            let updates = LiveUpdates(reply: terminal, interval: .zero, clock: SystemClock(), logger: Logger(label: "chatbridge.chat"))
            let resolution: Resolution
            do {
                resolution = try await engine.resolve(message) { delta in updates.append(delta) }
            } catch {
                await updates.close()
                throw error
            }
            await updates.close()
            try await terminal.finish(resolution.text)
            try await store.apply(resolution.effect, to: engine.conversationKey(for: message))
            return true
        } catch {
            if terminal.hasShownText { FileHandle.standardOutput.write(Data("\n".utf8)) }
            // The person at the terminal is the operator: an unreachable model is reported as exactly that.
            let line: String
            if let error = error as? ModelError, error.kind == .connection {
                line = "error: \(error)"
            } else {
                line = "error: \(engine.settings.messages.reply(for: error)) (\(error))"
            }
            FileHandle.standardError.write(Data((line + "\n").utf8))
            return false
        }
    }
}

/// Standard output as a live reply: prints what each update adds to what is already shown.
final class TerminalReply: LiveReply {
    private let shown = Mutex("")

    var hasShownText: Bool { shown.withLock { !$0.isEmpty } }

    func open(resuming: Bool) async throws {}

    func update(_ text: String) async throws { write(text) }

    func finish(_ text: String) async throws {
        write(text)
        FileHandle.standardOutput.write(Data("\n".utf8))
    }

    func fail(_ text: String) async throws { try await finish(text) }

    private func write(_ text: String) {
        // The final text is trimmed at the start; what was shown may not have been.
        let text = String(text.drop(while: \.isWhitespace))
        let addition = shown.withLock { shown -> String in
            defer { shown = text }
            if text.hasPrefix(shown) { return String(text.dropFirst(shown.count)) }
            return shown.isEmpty ? text : "\n" + text
        }
        if !addition.isEmpty { FileHandle.standardOutput.write(Data(addition.utf8)) }
    }
}
