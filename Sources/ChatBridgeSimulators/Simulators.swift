import ChatBridgeCore
import Foundation
import Hummingbird
import HummingbirdCore
import HTTPTypes
import HummingbirdWebSocket
import Logging
import NIOCore
import NIOFoundationCompat
import NIOHTTP1
import ServiceLifecycle
import Synchronization

/// A Hummingbird server on loopback, started in the background and stopped with `stop()`.
public final class LoopbackServer: Sendable {
    public let port: Int
    private let task: Task<Void, any Error>
    private let group: ServiceGroup

    private init(port: Int, task: Task<Void, any Error>, group: ServiceGroup) {
        self.port = port
        self.task = task
        self.group = group
    }

    /// Starts `router` on `127.0.0.1:port` (0 picks a free port) and returns once it listens.
    public static func start(
        router: Router<BasicRequestContext>, port: Int = 0, name: String, server: HTTPServerBuilder = .http1()
    ) async throws -> LoopbackServer {
        var logger = Logger(label: "chatbridge.simulator.\(name)")
        logger.logLevel = .warning
        let (stream, continuation) = AsyncStream.makeStream(of: Int.self)
        let app = Application(
            router: router,
            server: server,
            configuration: .init(address: .hostname("127.0.0.1", port: port), serverName: name),
            onServerRunning: { channel in continuation.yield(channel.localAddress?.port ?? 0) },
            logger: logger
        )
        let group = ServiceGroup(configuration: .init(services: [app], logger: logger))
        let task = Task {
            defer { continuation.finish() }
            try await group.run()
        }
        var iterator = stream.makeAsyncIterator()
        guard let bound = await iterator.next() else {
            _ = try await task.value
            throw SimulatorError(description: "\(name) simulator stopped before listening")
        }
        return LoopbackServer(port: bound, task: task, group: group)
    }

    public var baseURL: String { "http://127.0.0.1:\(port)" }

    public func stop() async {
        await group.triggerGracefulShutdown()
        _ = try? await task.value
    }
}

public struct SimulatorError: Error, CustomStringConvertible {
    public var description: String
    public init(description: String) { self.description = description }
}

extension Response {
    static func json(_ status: HTTPResponse.Status = .ok, _ object: Any) -> Response {
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8)
        return Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(data: data)))
    }
}

/// Where a simulator holds requests: while closed, `pass()` waits until the gate opens.
final class Gate: Sendable {
    private let state: Mutex<(isOpen: Bool, waiting: [CheckedContinuation<Void, Never>])>

    init(open: Bool) { state = Mutex((open, [])) }

    func close() { state.withLock { $0.isOpen = false } }

    func open() {
        let waiting = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            state.isOpen = true
            defer { state.waiting = [] }
            return state.waiting
        }
        for continuation in waiting { continuation.resume() }
    }

    func pass() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let now = state.withLock { state -> Bool in
                guard !state.isOpen else { return true }
                state.waiting.append(continuation)
                return false
            }
            if now { continuation.resume() }
        }
    }
}

/// The "go silent" switch of a simulated WebSocket gateway: while it is on, open connections neither read
/// nor write, like connections a NAT dropped. Ending it affects new connections only.
final class Silence: Sendable {
    private let current = Mutex(OneTimeEvent())

    /// Happens when the silence begins; replaced by a fresh one when it ends.
    var event: OneTimeEvent { current.withLock { $0 } }
    func begin() { event.signal() }
    func end() { current.withLock { $0 = OneTimeEvent() } }

    /// Serves one connection: hands each message to `receive` until the connection is closed (`close`,
    /// or the peer), or the silence begins. Silent, it calls `onSilent` and then neither reads (so pings go
    /// unanswered) nor writes until `close` or `stopped` happens.
    func serve(
        inbound: WebSocketInboundStream, close: OneTimeEvent, stopped: OneTimeEvent, onSilent: @Sendable () -> Void,
        receive: @escaping @Sendable (WebSocketMessage) async -> Void
    ) async {
        let silent = event
        let silenced = await withTaskGroup(of: Bool.self) { group in
            group.addTask {
                do {
                    for try await message in inbound.messages(maxSize: 1 << 20) {
                        if silent.hasHappened { return true }
                        await receive(message)
                    }
                } catch {}
                return false
            }
            group.addTask {
                await close.wait()
                return false
            }
            group.addTask {
                // Silence also while nothing arrives.
                await silent.wait()
                return !Task.isCancelled
            }
            let first = await group.next() ?? false
            group.cancelAll()
            return first
        }
        guard silenced else { return }
        onSilent()
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await stopped.wait() }
            group.addTask { await close.wait() }
            await group.next()
            group.cancelAll()
        }
    }
}
