import AsyncHTTPClient
import ChatBridgeCore
import ChatBridgeDingTalk
import ChatBridgeHTTP
import ChatBridgeSimulators
import Foundation
import Logging
import Testing

/// The DingTalk reply channel against the DingTalk simulator: how every answer DingTalk can give is read.
@Suite(.serialized) struct ReplyChannelTests {
    struct Setup {
        let dingtalk: DingTalkSimulator
        let client: HTTPClient
        let channel: DingTalkReplyChannel

        static func make(openAPI: Bool = true, timeout: Duration = .seconds(15)) async throws -> Setup {
            let dingtalk = try await DingTalkSimulator.start()
            let client = OutboundHTTP.makeClient()
            let settings = DingTalkSettings(
                clientID: openAPI ? "dingbot" : "", clientSecret: "secret", robotCode: "dingbot", apiBaseURL: dingtalk.baseURL,
                webhookHosts: ["127.0.0.1"])
            var logger = Logger(label: "t")
            logger.logLevel = .critical
            let channel = DingTalkReplyChannel(settings: settings, client: client, requestTimeout: timeout, logger: logger)
            return Setup(dingtalk: dingtalk, client: client, channel: channel)
        }

        func message(group: Bool = false, webhook: Bool = true) -> InboundMessage {
            InboundMessage(
                platform: "dingtalk", botID: "dingbot", messageID: "m1", chat: .init(id: "cidChat==", kind: group ? .group : .direct),
                sender: .init(id: "$:s", staffID: "0420001", name: "Ann"), body: .text("q"),
                reply: .init(
                    webhookURL: webhook ? dingtalk.webhookURL(session: "s1") : nil,
                    webhookExpiresAt: Date().addingTimeInterval(3600)),
                sentAt: Date())
        }

        func deliveryError(_ message: InboundMessage? = nil) async -> DeliveryError? {
            do {
                try await channel.deliver(part: "hello", replyingTo: message ?? self.message())
                return nil
            } catch {
                return error as? DeliveryError
            }
        }

        func stop() async {
            try? await client.shutdown()
            await dingtalk.stop()
        }
    }

    @Test func aWebhookErrcodeIsClassifiedAndAPermanentOneFallsBackToTheOpenAPI() async throws {
        let s = try await Setup.make(openAPI: false)
        s.dingtalk.scriptWebhook(.errcode(130101, "send too fast"))
        let throttled = try #require(await s.deliveryError())
        #expect(throttled.isRetryable && !throttled.mayHaveBeenDelivered)
        #expect(throttled.reason.contains("130101"))
        s.dingtalk.scriptWebhook(.errcode(300001, "session expired"))
        let permanent = try #require(await s.deliveryError())
        #expect(!permanent.isRetryable && !permanent.mayHaveBeenDelivered)
        s.dingtalk.scriptWebhook(.errcode(15, "isp.top-remote-connection-timeout"))
        #expect(try #require(await s.deliveryError()).mayHaveBeenDelivered)
        #expect(s.dingtalk.deliveries.isEmpty)
        await s.stop()

        // With OpenAPI credentials, a webhook known not to have delivered falls back at once.
        let t = try await Setup.make()
        t.dingtalk.scriptWebhook(.errcode(300001, "session expired"))
        #expect(await t.deliveryError() == nil)
        #expect(t.dingtalk.deliveries.map(\.channel) == [.direct])
        await t.stop()
    }

    @Test func aWebhook200ThatIsNotJSONIsNotASuccessAndIsNotSentElsewhere() async throws {
        let s = try await Setup.make()
        s.dingtalk.scriptWebhook(.notJSON)
        let error = try #require(await s.deliveryError())
        #expect(error.mayHaveBeenDelivered)
        #expect(s.dingtalk.sendRequests == 0)
        await s.stop()
    }

    @Test func aWebhookSendThatTimesOutMayHaveBeenDeliveredAndIsNotSentThroughTheOpenAPI() async throws {
        let s = try await Setup.make(timeout: .milliseconds(500))
        s.dingtalk.scriptWebhook(.deliveredThenHeld)
        let error = try #require(await s.deliveryError())
        #expect(error.mayHaveBeenDelivered)
        #expect(s.dingtalk.deliveries.count == 1)
        #expect(s.dingtalk.sendRequests == 0)
        s.dingtalk.releaseHeld()
        await s.stop()
    }

    @Test func batchSendListsMeanNotDelivered() async throws {
        let s = try await Setup.make()
        let direct = s.message(webhook: false)
        s.dingtalk.scriptSend(DingTalkSimulator.Scripted(body: #"{"processQueryKey":"k","flowControlledStaffIdList":["0420001"],"invalidStaffIdList":[]}"#))
        let flow = try #require(await s.deliveryError(direct))
        #expect(flow.isRetryable && !flow.mayHaveBeenDelivered)
        #expect(flow.retryAfter != nil)
        #expect(flow.reason.contains("flowControlledStaffIdList"))
        s.dingtalk.scriptSend(DingTalkSimulator.Scripted(body: #"{"processQueryKey":"k","flowControlledStaffIdList":[],"invalidStaffIdList":["0420001"]}"#))
        let invalid = try #require(await s.deliveryError(direct))
        #expect(!invalid.isRetryable)
        #expect(invalid.reason.contains("invalidStaffIdList"))
        // Another user's trouble is not this user's.
        s.dingtalk.scriptSend(DingTalkSimulator.Scripted(body: #"{"processQueryKey":"k","flowControlledStaffIdList":["someone-else"]}"#))
        #expect(await s.deliveryError(direct) == nil)
        await s.stop()
    }

    @Test func aThrottledTokenRequestIsRetryableAndARefusedOneIsNot() async throws {
        let s = try await Setup.make()
        let direct = s.message(webhook: false)
        s.dingtalk.scriptToken(.failure(403, code: "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi"))
        #expect(try #require(await s.deliveryError(direct)).isRetryable)
        s.dingtalk.scriptToken(.failure(429, code: "Throttling"))
        #expect(try #require(await s.deliveryError(direct)).isRetryable)
        s.dingtalk.scriptToken(.failure(400, code: "invalidClientSecret"))
        let refused = try #require(await s.deliveryError(direct))
        #expect(!refused.isRetryable)
        #expect(refused.reason.contains("dingtalk.client_secret"))
        #expect(await s.deliveryError(direct) == nil)
        await s.stop()
    }

    @Test func redirectsAreNeverFollowed() async throws {
        let s = try await Setup.make(openAPI: false)
        s.dingtalk.scriptWebhook(.redirect)
        let webhook = try #require(await s.deliveryError())
        #expect(!webhook.isRetryable && !webhook.mayHaveBeenDelivered)
        await s.stop()

        let t = try await Setup.make()
        t.dingtalk.scriptSend(.redirect)
        let openAPI = try #require(await t.deliveryError(t.message(group: true, webhook: false)))
        #expect(openAPI.reason.contains("redirect"))
        // Nothing followed the redirects, so no access token travelled anywhere else.
        #expect(t.dingtalk.stolenRequests.isEmpty)
        #expect(s.dingtalk.stolenRequests.isEmpty)
        await t.stop()
    }

    @Test func aGatewayTimeoutMayHaveBeenDeliveredAndOtherServerErrorsAreRetryable() async throws {
        let s = try await Setup.make()
        let group = s.message(group: true, webhook: false)
        s.dingtalk.scriptSend(.failure(504, code: "GatewayTimeout"))
        #expect(try #require(await s.deliveryError(group)).mayHaveBeenDelivered)
        s.dingtalk.scriptSend(.failure(503, code: "ServiceUnavailable"))
        let unavailable = try #require(await s.deliveryError(group))
        #expect(unavailable.isRetryable && !unavailable.mayHaveBeenDelivered)
        s.dingtalk.scriptSend(.failure(403, code: "Forbidden.AccessDenied.QpsLimitForApi"))
        #expect(try #require(await s.deliveryError(group)).isRetryable)
        await s.stop()
    }
}

